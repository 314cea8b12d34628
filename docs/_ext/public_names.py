"""Point type hints at the public names that other projects document.

Autodoc writes a type hint by the module its class is defined in, such as
``torch.nn.modules.module.Module`` or ``transformers.tokenization_utils_base.X``, but those
projects document the class under its public name (``torch.nn.Module``, ``transformers.X``).
When such a reference is not found, this retries it under the public name.
"""

from sphinx.ext import intersphinx

# Private name -> public name, for names the rule below does not cover.
ALIASES = {
    "torch.nn.modules.module.Module": "torch.nn.Module",
    "torch.optim.optimizer.Optimizer": "torch.optim.Optimizer",
    "torch._C.Generator": "torch.Generator",
    # In transformers 5, PreTrainedTokenizerFast is another name of TokenizersBackend.
    "transformers.tokenization_utils_tokenizers.TokenizersBackend": "transformers.PreTrainedTokenizerFast",
}


def public_name(target: str) -> str | None:
    if target in ALIASES:
        return ALIASES[target]
    parts = target.split(".")
    if parts[0] == "transformers" and len(parts) > 2:  # transformers exports every class at the top
        return f"transformers.{parts[-1]}"
    return None


def retry_under_public_name(app, env, node, contnode):
    public = public_name(node.get("reftarget", ""))
    if public is None:
        return None
    node["reftarget"] = public
    return intersphinx.missing_reference(app, env, node, contnode)


def setup(app):
    app.connect("missing-reference", retry_under_public_name)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
