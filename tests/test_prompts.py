"""Class names and prompt templates for CLIP zero-shot heads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lit_adamerging.models import prompts
from lit_adamerging.models.prompts import TASKS, class_names, format_prompts, read_class_names, templates

EXPECTED_COUNTS = {
    "sun397": 397,
    "cars": 196,
    "resisc45": 45,
    "eurosat": 10,
    "svhn": 10,
    "gtsrb": 43,
    "mnist": 10,
    "dtd": 47,
    "fashion_mnist": 10,
    "cifar10": 10,
}
PAPER_TASKS = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
OFFLINE_TASKS = ("mnist", "fashion_mnist", "cifar10", "gtsrb")


def test_tasks_cover_paper_and_offline_datasets() -> None:
    assert set(TASKS) == set(EXPECTED_COUNTS)
    assert TASKS[: len(PAPER_TASKS)] == PAPER_TASKS
    assert len(set(TASKS)) == len(TASKS)
    assert all(task == task.lower() for task in TASKS)


@pytest.mark.parametrize("task", sorted(EXPECTED_COUNTS))
def test_class_counts_and_no_duplicates(task: str) -> None:
    names = class_names(task)
    assert len(names) == EXPECTED_COUNTS[task]
    assert len(set(names)) == len(names), [name for name in names if names.count(name) > 1]
    assert all(isinstance(name, str) and name == name.strip() and name for name in names)


@pytest.mark.parametrize("task", TASKS)
def test_templates_have_exactly_one_placeholder(task: str) -> None:
    task_templates = templates(task)
    assert len(task_templates) >= 1
    assert len(set(task_templates)) == len(task_templates)
    for template in task_templates:
        assert template.count("{}") == 1 and template.count("{") == 1 and template.count("}") == 1, template
    prompts_for_first = format_prompts(class_names(task)[0], task_templates)
    assert len(prompts_for_first) == len(task_templates)
    assert all(class_names(task)[0] in prompt for prompt in prompts_for_first)


def test_returned_lists_are_copies() -> None:
    names = class_names("mnist")
    names.append("ten")
    names[0] = "zero"
    assert class_names("mnist") == [str(digit) for digit in range(10)]
    task_templates = templates("cifar10")
    task_templates.clear()
    assert len(templates("cifar10")) == 18


def test_known_names_and_templates() -> None:
    assert class_names("sun397")[:3] == ["abbey", "airplane cabin", "airport terminal"]
    assert class_names("sun397")[-1] == "youth hostel"
    # torchvision's SUN397 order follows ClassName.txt, where "/j/jail/indoor" precedes "/j/jail_cell".
    sun = class_names("sun397")
    assert sun.index("jail indoor") + 1 == sun.index("jail cell")
    assert class_names("cars")[:2] == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    assert class_names("cars")[-1] == "smart fortwo Convertible 2012"
    assert class_names("resisc45")[:3] == ["airplane", "airport", "baseball diamond"]
    assert class_names("resisc45") == sorted(class_names("resisc45"))
    assert class_names("eurosat") == [
        "annual crop land",
        "forest",
        "brushland or shrubland",
        "highway or road",
        "industrial buildings or commercial buildings",
        "pasture land",
        "permanent crop land",
        "residential buildings or homes or apartments",
        "river",
        "lake or sea",
    ]
    assert class_names("svhn") == class_names("mnist") == [str(digit) for digit in range(10)]
    assert class_names("dtd")[:2] == ["banded", "blotchy"]
    assert class_names("dtd") == sorted(class_names("dtd"))
    gtsrb = class_names("gtsrb")
    assert "20" in gtsrb[0] and "30" in gtsrb[1] and "stop" == gtsrb[14]
    assert templates("mnist") == templates("svhn") == ['a photo of the number: "{}".']
    assert "a centered satellite photo of {}." in templates("eurosat")
    assert len(templates("resisc45")) == 18 and "satellite imagery of {}." in templates("resisc45")
    assert len(templates("cifar10")) == 18 and "a blurry photo of a {}." in templates("cifar10")
    assert templates("sun397") == ["a photo of a {}.", "a photo of the {}."]
    assert "a photo of my {}." in templates("cars")
    assert "a photo of a {} texture." in templates("dtd")
    assert 'a zoomed in photo of a "{}" traffic sign.' in templates("gtsrb")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_offline_datasets_agree_in_count_and_order(task: str, offline_datasets) -> None:
    root = offline_datasets(task) / task
    folders = sorted(entry.name for entry in (root / "test").iterdir() if entry.is_dir())
    names = class_names(task)
    assert len(names) == len(folders)
    for label, (folder, name) in enumerate(zip(folders, names)):
        number, _, slug = folder.partition("_")
        assert int(number) == label, folder
        # Same class in the same position: the folder slug is the slugged readable name.
        assert _slug(name) == slug, (label, folder, name)
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        assert read_class_names(classes_txt) == names


def test_format_prompts() -> None:
    assert format_prompts("cat", ["a photo of a {}.", "{}!"]) == ["a photo of a cat.", "cat!"]
    # The name is inserted verbatim, even if it holds braces.
    assert format_prompts("{odd}", ["a {} here."]) == ["a {odd} here."]
    assert format_prompts("cat", []) == []
    for bad in ("no placeholder.", "two {} and {}.", "named {name}.", "a {} and {x}.", "{0}."):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            format_prompts("cat", ["a photo of a {}.", bad])
    with pytest.raises(TypeError):
        format_prompts("cat", "a photo of a {}.")


def test_read_class_names(tmp_path: Path) -> None:
    path = tmp_path / "classes.txt"
    path.write_text("cat\n\n  dog  \nsea lake\n\n", encoding="utf-8")
    assert read_class_names(path) == ["cat", "dog", "sea lake"]
    assert read_class_names(str(path)) == ["cat", "dog", "sea lake"]

    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_class_names(missing)

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no class names"):
        read_class_names(empty)

    repeated = tmp_path / "repeated.txt"
    repeated.write_text("cat\ndog\ncat\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'cat'"):
        read_class_names(repeated)


@pytest.mark.parametrize("getter", [class_names, templates])
def test_unknown_task(getter) -> None:
    with pytest.raises(KeyError) as info:
        getter("imagenet")
    message = str(info.value)
    assert "imagenet" in message
    assert all(task in message for task in TASKS)
    assert "config" in message
    with pytest.raises(KeyError, match="SUN397"):
        getter("SUN397")  # names are lowercase


def test_module_tables_agree() -> None:
    assert set(prompts._CLASS_NAMES) == set(prompts._TEMPLATES) == set(TASKS)
