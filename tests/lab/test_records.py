"""Recorded runs: read back number for number, read only while their code is current, and
reproduced by the current code; every recorded function has its record."""

import ast
import importlib
import inspect
import json
import pkgutil

import pytest
import torch

import fieldguide
from fieldguide.lab import records
from fieldguide.lab.experiment import make_run
from fieldguide.lab.records import RECORDS, dependencies, recorded, source_hash


def recorded_functions() -> dict[str, object]:
    """Every function of the package that ``recorded`` wraps, by its record file's stem."""
    found = {}
    for module_info in pkgutil.walk_packages(fieldguide.__path__, "fieldguide."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for value in vars(module).values():
            if (
                callable(value)
                and getattr(value, "recorded", None) is True
                and value.__module__ == module.__name__
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


RECORDED = recorded_functions()


def _toy(value: int):
    """A run's numbers and an adapter, without training anything."""
    run = make_run(torch.nn.Linear(2, 1), [0, 1, 0], [1, 1, value % 2], [0.7, 0.1 * value], 2.0, 40)
    run.adapter = {"lora_A": torch.full((2, 3), float(value)), "lora_B": torch.arange(4.0)}
    return run


def same_run(a, b) -> bool:
    """Equal numbers and equal adapter tensors (a dataclass's == leaves the adapter out)."""
    return (
        a == b
        and a.adapter.keys() == b.adapter.keys()
        and all(torch.equal(a.adapter[k], b.adapter[k]) for k in a.adapter)
    )


def test_a_recorded_run_reads_back_number_for_number(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RECORDS", tmp_path)
    monkeypatch.delenv("FIELD_GUIDE_RECORDS", raising=False)
    calls = []

    @recorded
    def run(value: int = 3, name: str = "a"):
        calls.append(value)
        return _toy(value)

    @recorded
    def both():
        return {"second": _toy(2), "first": _toy(1)}

    monkeypatch.setenv("FIELD_GUIDE_RECORD", "1")
    made, made_both = run(), both()
    monkeypatch.delenv("FIELD_GUIDE_RECORD")
    read_both = both()
    assert list(read_both) == ["second", "first"]  # in its order
    assert all(same_run(read_both[name], made_both[name]) for name in made_both)
    assert same_run(run(3, name="a"), made) and calls == [3]  # read from the record, not computed again
    run(5)  # a call that was never recorded is computed
    assert calls == [3, 5]
    saved = json.loads(next(tmp_path.glob("*run.json")).read_text())
    assert saved["source_hash"] == source_hash(run.__module__)
    assert all(set(entry["machine"]) >= {"date", "processor", "torch"} for entry in saved["runs"].values())


def test_a_missing_record_is_refused_where_records_are_required(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RECORDS", tmp_path)
    monkeypatch.setenv("FIELD_GUIDE_RECORDS", "required")
    calls = []

    @recorded
    def run(value: int = 3):
        calls.append(value)
        return _toy(value)

    with pytest.raises(RuntimeError, match="nox -s record"):
        run()
    assert calls == []  # refused before anything trained


def test_a_record_of_other_code_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RECORDS", tmp_path)
    monkeypatch.delenv("FIELD_GUIDE_RECORDS", raising=False)
    calls = []

    @recorded
    def run(value: int = 3):
        calls.append(value)
        return _toy(value)

    monkeypatch.setenv("FIELD_GUIDE_RECORD", "1")
    run()
    monkeypatch.delenv("FIELD_GUIDE_RECORD")
    path = next(tmp_path.glob("*.json"))
    stale = json.loads(path.read_text()) | {"source_hash": "0" * 16}
    path.write_text(json.dumps(stale))
    run()
    assert calls == [3, 3]


def test_dependencies_follow_imports_through_the_package():
    found = dependencies("fieldguide.parameter_efficient.dora")
    assert {
        "fieldguide.parameter_efficient.lora",
        "fieldguide.lab.training",
        "fieldguide.lab.corpus",
    } <= set(found)
    assert "fieldguide.parameter_efficient.prompt_tuning" not in found


def test_the_records_exist():
    assert RECORDED, "no function is recorded"
    assert RECORDS.is_dir(), f"{RECORDS} is missing: run `nox -s record`"


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_every_recorded_function_has_a_current_record(name):
    path = RECORDS / f"{name}.json"
    assert path.is_file(), f"{name} has no record: run `nox -s record`"
    record = json.loads(path.read_text())
    assert record["source_hash"] == source_hash(RECORDED[name].__module__), (
        f"{path.name} was recorded from other code than today's: run `nox -s record`"
    )
    assert record["runs"], f"{path.name} records no run"


@pytest.mark.parametrize("path", sorted(RECORDS.glob("*.json")), ids=lambda path: path.stem)
def test_every_record_belongs_to_a_recorded_function(path):
    assert path.stem in RECORDED, (
        f"{path.name} records a function that is gone or no longer recorded: delete it"
    )


def test_the_current_code_reproduces_a_record():
    """The shortest recorded run, trained again here, starts as its record does: the score
    before training and the first losses. The tolerances allow for another processor, whose
    rounding gives a slightly different tiny model; a record of other code or other
    arguments misses them by far more. (Later losses may part: a long run amplifies rounding.)"""
    candidates = []
    for name in RECORDED:
        for key, numbers in json.loads((RECORDS / f"{name}.json").read_text())["runs"].items():
            if "losses" in numbers:
                candidates.append((len(numbers["losses"]), name, key, numbers))
    _, name, key, numbers = min(candidates, key=lambda candidate: candidate[:3])
    arguments = ast.literal_eval(key)  # the repr of a dict of plain values
    again = inspect.unwrap(RECORDED[name])(**arguments)  # computed, neither read nor cached
    recorded_run = records.run_from_json(numbers, RECORDS / name)
    assert again.before.value == pytest.approx(recorded_run.before.value, abs=0.01)
    assert again.losses[:20] == pytest.approx(recorded_run.losses[:20], abs=1e-2)
    assert len(again.losses) == len(recorded_run.losses)
