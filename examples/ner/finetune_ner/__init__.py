"""finetune-ner: token classification (named entities) as a finetune task plugin."""

from finetune_ner.task import EntityScores, TokenClassification, entity_spans

__all__ = ["EntityScores", "TokenClassification", "entity_spans"]
