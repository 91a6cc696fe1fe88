"""CONFIG.md is generated from the typed schemas: it must list every key with its current default."""

from __future__ import annotations

from medfm.config_reference import REFERENCE, reference_markdown


def test_the_config_reference_is_generated_from_the_current_schemas():
    assert REFERENCE.read_text() == reference_markdown(), "CONFIG.md is stale: run python -m medfm.config_reference"


def test_the_reference_documents_nested_and_method_keys_with_their_comments():
    text = reference_markdown()
    for line in (
        "| `dinov2.koleo_loss_weight` |",
        "| `features.pooling` | `str` | `head` |",
        "| `recipes[].overrides` |",
        "| `model.init` |",
        "| `tasks[].published.NAME.acc` |",
    ):
        assert line in text, line
    assert "any timm model name" in text  # the comment beside model.backbone
