"""Runs recorded in the repository, so that a page need not train them again to print them.

A page that searches a learning rate or repeats a run over seeds trains many models to print a
few lines; computed at every build, those runs would take the site's doctests past what a
laptop should wait. ``recorded`` keeps the numbers of such a run (scores, losses, outcomes) and
its adapter's tensors, never a whole model, in ``docs/_records``: one JSON file per function,
with a folder of safetensors files beside it, written by ``nox -s record``. Each
file carries the hash of the source files its function's module depends on, following its
imports through the package (``dependencies``): a record is read only while that hash is the
current one, and otherwise the run is computed as if there were no record (or refused, under
``FIELD_GUIDE_RECORDS=required``, which ``nox -s tests`` sets), while ``tests/lab/test_records.py``
fails until the records are made again. The libraries' versions are not part of the hash: a
record is read whatever is installed, and says what computed it. Each recorded run also
names the libraries and the processor that computed it, which the lab page prints.
"""

import ast
import copy
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

from safetensors.torch import load_file, save

import fieldguide
from fieldguide.lab.experiment import Run
from fieldguide.lab.stats import Score

PACKAGE = Path(fieldguide.__file__).resolve().parent
# Beside the pages, in a checkout; a package installed without the repository has none, and
# computes every run.
RECORDS = Path(os.environ.get("FIELD_GUIDE_RECORDS_DIR", PACKAGE.parents[1] / "docs" / "_records"))
LIBRARIES = ("torch", "transformers", "peft", "trl")


def module_path(module: str) -> Path | None:
    """The source file of a ``fieldguide`` module, or None for a name that is not one."""
    if not module.startswith("fieldguide."):
        return None
    relative = Path(*module.split(".")[1:])
    for path in (PACKAGE / relative).with_suffix(".py"), PACKAGE / relative / "__init__.py":
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """The ``fieldguide`` modules that the source file ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from fieldguide.parameter_efficient import lora" imports a module too
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name.startswith("fieldguide.") and module_path(name)}
    return found


def dependencies(module: str) -> list[str]:
    """``module`` and every ``fieldguide`` module it imports, directly or not, sorted."""
    seen, waiting = set(), [module]
    while waiting:
        name = waiting.pop()
        if name not in seen and module_path(name) is not None:
            seen.add(name)
            waiting.extend(imported_modules(module_path(name)))
    return sorted(seen)


def source_hash(module: str) -> str:
    """A hash of the source of ``module`` and of everything in ``fieldguide`` it imports."""
    digest = hashlib.sha256()
    for name in dependencies(module):
        digest.update(name.encode() + module_path(name).read_bytes())
    return digest.hexdigest()[:16]


def machine() -> dict[str, str]:
    """What computed a record: the date, the libraries' versions and the processor."""
    processor = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux names the model; platform.processor() often says only "x86_64"
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        processor = f"{names[0]}, {len(names)} cores" if names else processor
    versions = {library: importlib.metadata.version(library) for library in LIBRARIES}
    return {"date": date.today().isoformat(), "processor": processor, **versions}


def run_to_json(run: Run, adapters: Path) -> dict:
    """A run's numbers, its adapter saved under ``adapters`` (a file named by the tensors'
    hash); a model or tokenizer it kept is not recorded."""
    numbers = asdict(replace(run, model=None, tokenizer=None, adapter=None))
    for kept in ("model", "tokenizer", "adapter"):
        del numbers[kept]
    if run.adapter is not None:
        adapters.mkdir(parents=True, exist_ok=True)
        data = save({name: tensor.contiguous() for name, tensor in run.adapter.items()})
        numbers["adapter_file"] = f"{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
        (adapters / numbers["adapter_file"]).write_bytes(data)
    return numbers


def run_from_json(numbers: dict, adapters: Path) -> Run:
    """The run ``run_to_json`` recorded, its adapter read back from ``adapters``."""
    numbers = copy.deepcopy(numbers)  # the parsed file is shared: a caller may change its lists
    numbers.pop("machine", None)  # what computed it, which the Run does not hold
    adapter_file = numbers.pop("adapter_file", None)
    scores = {name: Score(**numbers[name]) for name in ("before", "after", "gain")}
    run = Run(**{**numbers, **scores, "outcomes": tuple(numbers["outcomes"])})
    if adapter_file is not None:
        run.adapter = load_file(adapters / adapter_file)
    return run


def _record_path(function: Callable) -> Path:
    return RECORDS / f"{function.__module__}.{function.__qualname__}.json"


def _adapters_path(function: Callable) -> Path:
    """The folder of a function's recorded adapters, beside its record."""
    return _record_path(function).with_suffix("")


@functools.cache
def _parse(path: Path, modified: int) -> dict:
    return json.loads(path.read_text())


def read_record(function: Callable) -> dict | None:
    """The record file of ``function``, or None if it has none (read once while unchanged)."""
    path = _record_path(function)
    return _parse(path, path.stat().st_mtime_ns) if path.is_file() else None


def recording() -> bool:
    """Whether runs are being recorded (``FIELD_GUIDE_RECORD=1``, as ``nox -s record`` sets)."""
    return os.environ.get("FIELD_GUIDE_RECORD") == "1"


def records_required() -> bool:
    """Whether a recorded function that finds no current record must fail rather than train
    (``FIELD_GUIDE_RECORDS=required``, as ``nox -s tests`` sets: a page that would train a
    recorded run is a page that has outgrown the time its doctests are given)."""
    return os.environ.get("FIELD_GUIDE_RECORDS") == "required"


def _write_entry(function: Callable, key: str, result: Run | dict) -> None:
    """Add one run to ``function``'s record, starting the record afresh if its code changed.
    Each run names the machine that computed it: one record can hold runs of several."""
    current, adapters = source_hash(function.__module__), _adapters_path(function)
    record = read_record(function)
    if record is None or record["source_hash"] != current:
        record = {"source_hash": current, "runs": {}}
        shutil.rmtree(adapters, ignore_errors=True)  # the old code's adapters
    else:
        record = copy.deepcopy(record)  # the parsed file is shared by every reader
    if isinstance(result, Run):
        record["runs"][key] = {"machine": machine(), **run_to_json(result, adapters)}
    else:  # a dict of runs, in its order
        runs = {name: run_to_json(run, adapters) for name, run in result.items()}
        record["runs"][key] = {"machine": machine(), "runs": runs}
    record["runs"] = dict(sorted(record["runs"].items()))  # a stable file: small diffs
    RECORDS.mkdir(parents=True, exist_ok=True)
    descriptor, scratch = tempfile.mkstemp(dir=RECORDS, suffix=".writing")
    os.close(descriptor)
    Path(scratch).write_text(_format(record))
    Path(scratch).replace(_record_path(function))  # a reader sees the old file or the new, never half


def _format(record: dict) -> str:
    """JSON with one line per run: a diff shows which runs changed."""
    runs = ",\n".join(
        f"  {json.dumps(key)}: {json.dumps(numbers)}" for key, numbers in record["runs"].items()
    )
    head = ",\n".join(
        f" {json.dumps(name)}: {json.dumps(value)}" for name, value in record.items() if name != "runs"
    )
    return f'{{\n{head},\n "runs": {{\n{runs}\n }}\n}}\n'


def call_key(function: Callable, args: tuple, kwargs: dict) -> str:
    """The arguments of a call, defaults filled in: ``f()`` and ``f(seed=0)`` are one run."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return repr(dict(bound.arguments))


def recorded(function: Callable) -> Callable:
    """Read ``function``'s run from its record while the record's code is the current code;
    otherwise compute it (and add it to the record when ``recording()``).

    ``function`` returns a ``Run`` or a dict of them. The numbers and the adapter's tensors
    are recorded, not a kept model: a function whose callers need the trained model is not
    one to record. While recording, a run still goes through ``function`` itself, so a run
    that the local cache (``cached``) holds for the same code, libraries and tiny model is
    read from there rather than trained again.
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        key = call_key(function, args, kwargs)
        if not recording():
            record = read_record(function)
            if (
                record is not None
                and key in record["runs"]
                and record["source_hash"] == source_hash(function.__module__)
            ):
                numbers, adapters = record["runs"][key], _adapters_path(function)
                if "runs" in numbers:
                    return {name: run_from_json(run, adapters) for name, run in numbers["runs"].items()}
                return run_from_json(numbers, adapters)
            if records_required():
                raise RuntimeError(
                    f"{function.__module__}.{function.__qualname__}{key} has no record made from "
                    "today's code: run `nox -s record` to train and record it (FIELD_GUIDE_RECORDS="
                    "required forbids training it here)"
                )
        result = function(*args, **kwargs)
        if recording():
            _write_entry(function, key, result)
        return result

    wrapper.recorded = True  # how the tests find every recorded function
    return wrapper
