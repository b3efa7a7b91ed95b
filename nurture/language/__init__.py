"""The journey language: YAML with positions, document models, expressions, templates, the compiler
and the intermediate form it produces. The lowest layer: it imports nothing else of Nurture."""
