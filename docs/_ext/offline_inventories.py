"""Small Sphinx inventories of the outside objects the site refers to.

An inventory maps an object's name (``torch.Tensor``) to the page that documents it. Sphinx
normally downloads one per project; the site uses these instead, so that a build is the same
online and offline and never waits on the network (transformers and PEFT publish none
anyway). Each entry is a real address in that project's documentation.
"""

import zlib
from pathlib import Path

# project -> (display name, base URL, [(object, Sphinx role, page relative to base URL)])
INVENTORIES = {
    "python": (
        "Python",
        "https://docs.python.org/3/",
        [
            ("int", "py:class", "library/functions.html#int"),
            ("float", "py:class", "library/functions.html#float"),
            ("str", "py:class", "library/stdtypes.html#str"),
            ("bool", "py:class", "library/functions.html#bool"),
            ("list", "py:class", "library/stdtypes.html#list"),
            ("dict", "py:class", "library/stdtypes.html#dict"),
            ("tuple", "py:class", "library/stdtypes.html#tuple"),
            ("None", "py:data", "library/constants.html#None"),
            ("ValueError", "py:exception", "library/exceptions.html#ValueError"),
            ("RuntimeError", "py:exception", "library/exceptions.html#RuntimeError"),
            ("pathlib.Path", "py:class", "library/pathlib.html#pathlib.Path"),
            ("argparse.ArgumentParser", "py:class", "library/argparse.html#argparse.ArgumentParser"),
            ("argparse.Namespace", "py:class", "library/argparse.html#argparse.Namespace"),
            ("collections.abc.Callable", "py:class", "library/collections.abc.html#collections.abc.Callable"),
            ("collections.abc.Iterator", "py:class", "library/collections.abc.html#collections.abc.Iterator"),
            ("collections.abc.Iterable", "py:class", "library/collections.abc.html#collections.abc.Iterable"),
            ("collections.abc.Hashable", "py:class", "library/collections.abc.html#collections.abc.Hashable"),
            ("random.Random", "py:class", "library/random.html#random.Random"),
            ("typing.Generic", "py:class", "library/typing.html#typing.Generic"),
        ],
    ),
    "torch": (
        "PyTorch",
        "https://docs.pytorch.org/docs/stable/",
        [
            ("torch.Tensor", "py:class", "tensors.html#torch.Tensor"),
            ("torch.nn.Module", "py:class", "generated/torch.nn.Module.html#torch.nn.Module"),
            # autodoc writes an annotation nn.Linear under the class's defining module
            ("torch.nn.modules.linear.Linear", "py:class", "generated/torch.nn.Linear.html#torch.nn.Linear"),
            ("torch.device", "py:class", "tensor_attributes.html#torch.device"),
            ("torch.dtype", "py:class", "tensor_attributes.html#torch.dtype"),
            ("torch.Generator", "py:class", "generated/torch.Generator.html#torch.Generator"),
            ("torch.optim.Optimizer", "py:class", "optim.html#torch.optim.Optimizer"),
        ],
    ),
    "transformers": (
        "Transformers",
        "https://huggingface.co/docs/transformers/main/en/",
        [
            ("transformers.PreTrainedModel", "py:class", "main_classes/model#transformers.PreTrainedModel"),
            (
                "transformers.PreTrainedTokenizerBase",
                "py:class",
                "main_classes/tokenizer#transformers.PreTrainedTokenizerBase",
            ),
            (
                "transformers.PreTrainedTokenizerFast",
                "py:class",
                "main_classes/tokenizer#transformers.PreTrainedTokenizerFast",
            ),
            ("transformers.LlamaForCausalLM", "py:class", "model_doc/llama#transformers.LlamaForCausalLM"),
            ("transformers.LlamaConfig", "py:class", "model_doc/llama#transformers.LlamaConfig"),
            ("transformers.Qwen2ForCausalLM", "py:class", "model_doc/qwen2#transformers.Qwen2ForCausalLM"),
            ("transformers.DynamicCache", "py:class", "internal/generation_utils#transformers.DynamicCache"),
        ],
    ),
    "peft": (
        "PEFT",
        "https://huggingface.co/docs/peft/main/en/",
        [
            ("peft.LoraConfig", "py:class", "package_reference/lora#peft.LoraConfig"),
            ("peft.peft_model.PeftModel", "py:class", "package_reference/peft_model#peft.PeftModel"),
        ],
    ),
}


def write_inventories(directory: Path) -> dict[str, Path]:
    """Write one ``objects.inv`` per project into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, (name, _, entries) in INVENTORIES.items():
        header = (
            "# Sphinx inventory version 2\n"
            f"# Project: {name}\n# Version: \n"
            "# The remainder of this file is compressed using zlib.\n"
        )
        body = "".join(f"{obj} {role} 1 {page} -\n" for obj, role, page in entries)
        paths[key] = directory / f"{key}.inv"
        paths[key].write_bytes(header.encode() + zlib.compress(body.encode()))
    return paths
