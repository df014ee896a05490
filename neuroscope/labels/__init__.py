"""Feature labels: where they come from (auto-interp, Neuronpedia, a fallback name), how they are
generated and scored, and where they are kept. See docs/labels.md.

Modules, one job each: ``store`` (journals and paths), ``examples`` (the corpus pass),
``labeler`` (the OpenAI-compatible client and its retries), ``autointerp`` (labelling prompts),
``scoring`` (detection scoring), ``neuronpedia`` (mapping, import, live fetch), ``sources`` (the
priority chain), ``firing`` (firing rates for display).
"""

from neuroscope.labels.labeler import DEFAULT_LABELER
from neuroscope.labels.sources import LabelResolver, fallback_label

__all__ = ["DEFAULT_LABELER", "LabelResolver", "fallback_label"]
