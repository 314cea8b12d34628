"""Alignment: from a model that follows instructions to one that answers as people prefer."""
