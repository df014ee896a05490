"""Side-by-side benchmarks of Neuroscope and its peers (the ``[bench]`` extra); see docs/benchmarks.md."""
