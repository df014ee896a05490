"""``python -m neuroscope``: the same command as ``neuroscope``."""

from neuroscope.cli import app

if __name__ == "__main__":
    app(prog_name="neuroscope")
