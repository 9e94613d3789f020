"""Prompt files come from outside: every bad file is refused with one line naming the file and the
offending key (issue 23, item 2), every file that loaded before loads the same, and the reader is cheap."""
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.image import Image
from LesionLocatorLib.prompts import (MAX_PROMPT_ID, Box, ManyPromptsWarning, MaskPrompt, Point, PromptError,
                                      VoxelPrompt, check_prompt_count, check_prompt_id, check_prompt_kind,
                                      parse_prompt_json, prompt_kind, prompts_from_labels, read_prompt_file,
                                      to_voxel_prompt)

W = '"format": "lesionlocator-world/1"'
P = '{"point": [1, 2, 3]}'


def world(*entries, head=f'{W}, "frame": "LPS", "units": "mm"'):
    """A world file with ``head`` and the given prompt entries (JSON text)."""
    return "{" + head + ', "prompts": [' + ", ".join(entries) + "]}"


BAD_FILES = [
    # --- JSON itself
    ("", PromptError, "not valid JSON"),
    ('{"1": {"point": [1, 2, 3]}', PromptError, "not valid JSON"),
    ("[" * 100_000, PromptError, "JSON nested too deeply"),
    (b'{"1": {"point": [1, 2, 3]}, "\xff": {"point": [1, 2, 3]}}', PromptError, "not valid JSON (not UTF-8 text"),
    # --- duplicate keys, at any level
    ('{"1": {"point": [1, 2, 3]}, "1": {"point": [4, 5, 6]}}', PromptError, 'duplicate key "1": JSON keeps only'),
    ('{"1": {"point": [1, 2, 3], "point": [4, 5, 6]}}', PromptError, 'duplicate key "point"'),
    (world('{"id": 1, "point": [1, 2, 3]}', head=f'{W}, "units": "mm", "units": "cm"'), PromptError,
     'duplicate key "units"'),
    (world('{"id": 1, "id": 2, "point": [1, 2, 3]}'), PromptError, 'duplicate key "id"'),
    # --- top level
    ("{}", PromptError, "no prompts found"),
    ('[{"id": 1, "point": [1, 2, 3]}]', PromptError, "the top level must be a JSON object such as"),
    ('"prompts"', PromptError, "the top level must be a JSON object such as {\"1\": {\"point\": [z, y, x]}} or"),
    ("42", PromptError, "must be a JSON object such as {\"1\": {\"point\": [z, y, x]}} or {\"1\": {\"box\": [zmin, "
     "zmax, ymin, ymax, xmin, xmax]}}, got a number"),
    ("null", PromptError, "got null"),
    # --- upstream IDs: 1..65535, no two keys for one ID
    ('{"0": ' + P + "}", PromptError, 'prompt "0": the ID 0 is out of range; prompt IDs are whole numbers from 1 '
     "to 65535 (the label images are uint16)"),
    ('{"-3": ' + P + "}", PromptError, 'prompt "-3": the ID -3 is out of range; prompt IDs are whole numbers'),
    ('{"70000": ' + P + "}", PromptError, 'prompt "70000": the ID 70000 is out of range; prompt IDs are whole '
     "numbers from 1 to 65535"),
    ('{"65536": ' + P + "}", PromptError, "the ID 65536 is out of range"),
    ('{"1e9": ' + P + "}", PromptError, 'prompt "1e9": the ID 1000000000 is out of range'),
    ('{"1.5": ' + P + "}", PromptError, 'prompt "1.5": the ID "1.5" is not a whole number; prompt IDs are whole '
     "numbers from 1 to 65535"),
    ('{"1": ' + P + ', "1.0": ' + P + "}", PromptError, 'prompt keys "1" and "1.0" are both ID 1; each prompt needs '
     "its own ID"),
    # --- upstream entries: an object with exactly one of point/box, finite numbers, non-empty boxes
    ('{"1": "1, 2, 3"}', PromptError, 'prompt "1" must be an object such as {"point": [z, y, x]}'),
    ('{"1": [1, 2, 3]}', PromptError, 'prompt "1" must be an object such as'),
    ('{"1": {"centre": [1, 2, 3]}}', PromptError, """prompt "1" has neither 'point' nor 'box' (its keys: "centre")"""),
    ('{"1": {}}', PromptError, "has neither 'point' nor 'box' (it is empty)"),
    ('{"1": {"point": [1, 2, 3], "box": [0, 1, 0, 1, 0, 1]}}', PromptError,
     """prompt "1" has both 'point' and 'box'; give one of them per prompt"""),
    ('{"1": {"point": [1, 2, 3], "label": 4}}', PromptError, 'prompt "1": unknown key "label" beside "point"'),
    ('{"1": {"point": "1, 2, 3"}}', PromptError, 'prompt "1": a point needs a list of 3 numbers [z, y, x], got'),
    ('{"1": {"point": [1, 2]}}', PromptError, "a point needs 3 values, got 2 (expected [z, y, x])"),
    ('{"1": {"box": [0, 1, 0, 1, 0, 1, 1]}}', PromptError, "a box needs 6 values, got 7"),
    ('{"1": {"box": ["a", 1, 2, 3, 4, 5]}}', PromptError, 'prompt "1": box values must be numbers, got ["a",'),
    ('{"1": {"point": [true, 2, 3]}}', PromptError, "point values must be numbers, got [true, 2, 3]"),
    ('{"1": {"point": [null, 2, 3]}}', PromptError, "point values must be numbers"),
    ('{"1": {"point": [[1], 2, 3]}}', PromptError, "point values must be numbers"),
    ('{"1": {"point": ["nan", 2, 3]}}', PromptError, 'prompt "1": point values must be finite numbers, got ["nan"'),
    ('{"1": {"box": [NaN, 5, 0, 5, 0, 5]}}', PromptError, "box values must be finite numbers, got [NaN, 5"),
    ('{"1": {"point": [Infinity, 2, 3]}}', PromptError, "point values must be finite numbers"),
    ('{"1": {"point": ["1e999", 2, 3]}}', PromptError, "point values must be finite numbers"),
    ('{"1": {"box": [5, 5, 0, 4, 0, 4]}}', PromptError, 'prompt "1": empty box along z: zmax 5 must exceed zmin 5'),
    ('{"1": {"box": [0, 4, 0, 4, 9, 2]}}', PromptError, "empty box along x: xmax 2 must exceed xmin 9 (box = "
     "[zmin, zmax, ymin, ymax, xmin, xmax], half-open)"),
    # --- world file: format, frame, units, keys
    (f'{{{W.replace("/1", "/2")}, "prompts": [{P}]}}', PromptError,
     '"format" must be "lesionlocator-world/1", got "lesionlocator-world/2"'),
    ('{"format": 1, "prompts": []}', PromptError, '"format" must be "lesionlocator-world/1", got 1'),
    ('{"prompts": [{"id": 1, "point": [1, 2, 3]}]}', PromptError,
     'not a world prompt file: "format": "lesionlocator-world/1" is missing'),
    (world(P, head=f'{W}, "frame": null'), PromptError, '"frame" must be "LPS", got null'),
    (world(P, head=f'{W}, "frame": "RAS"'), PromptError, '"frame" must be "LPS", got "RAS" (world prompts are LPS'),
    (world(P, head=f'{W}, "units": "cm"'), PromptError, '"units" must be "mm", got "cm" (convert the coordinates'),
    (world(P, head=f'{W}, "units": null'), PromptError, '"units" must be "mm", got null'),
    (world(P, head=f'{W}, "units": "MM"'), PromptError, '"units" must be "mm", got "MM"'),
    (world(P, head=f'{W}, "unit": "cm"'), PromptError, 'unknown key "unit" in a world prompt file (allowed: '
     '"format", "frame", "units", "prompts")'),
    (f"{{{W}}}", PromptError, 'no prompts found ("prompts" is missing)'),
    (world(), PromptError, 'no prompts found ("prompts" is empty)'),
    (f'{{{W}, "prompts": {{"1": {P}}}}}', PromptError, '"prompts" must be a list of prompts, got an object'),
    (f'{{{W}, "prompts": "1, 2, 3"}}', PromptError, '"prompts" must be a list of prompts, got a string'),
    (f'{{{W}, "prompts": null}}', PromptError, '"prompts" must be a list of prompts, got null'),
    # --- world prompts
    (world('"1, 2, 3"'), PromptError, 'prompts[0] must be an object such as {"id": 1, "point": [x, y, z]}, got '
     '"1, 2, 3"'),
    (world(P, "[1, 2, 3]"), PromptError, "prompts[1] must be an object such as"),
    (world('{"id": 1, "poin": [1, 2, 3]}'), PromptError, 'prompts[0]: unknown key "poin" (allowed: "id", "name", '
     '"point", "box")'),
    (world('{"id": 1}'), PromptError, "prompts[0] (id 1) has neither 'point' nor 'box'"),
    (world('{"id": 1, "point": [1, 2, 3], "box": [[0, 0, 0], [1, 1, 1]]}'), PromptError,
     "prompts[0] (id 1) has both 'point' and 'box'"),
    (world('{"id": 1, "box": [1, 2, 3]}'), PromptError,
     "prompts[0]: a box needs 2 corners [[x0, y0, z0], [x1, y1, z1]], got [1, 2, 3]"),
    (world('{"id": 1, "box": [[1, 2, 3], [4, 5]]}'), PromptError, "a box corner needs 3 values, got 2"),
    (world('{"id": 1, "box": [[1, 2, 3], [4, 5, NaN]]}'), PromptError, "box corner values must be finite numbers"),
    (world('{"id": 1, "point": [1, 2, "x"]}'), PromptError, 'prompts[0]: point values must be numbers'),
    (world('{"id": 1, "point": [1, 2, -Infinity]}'), PromptError, "point values must be finite numbers"),
    (world('{"id": 1, "point": [1, 2, 3], "name": ["a"]}'), PromptError, '"name" must be a string, got ["a"]'),
    # --- world IDs
    (world('{"id": 0, "point": [1, 2, 3]}'), PromptError, "prompts[0]: the ID 0 is out of range; prompt IDs are "
     "whole numbers from 1 to 65535"),
    (world('{"id": -3, "point": [1, 2, 3]}'), PromptError, "the ID -3 is out of range"),
    (world('{"id": 70000, "point": [1, 2, 3]}'), PromptError, "prompts[0]: the ID 70000 is out of range"),
    (world('{"id": 1.5, "point": [1, 2, 3]}'), PromptError, "the ID 1.5 is not a whole number"),
    (world('{"id": "1.5", "point": [1, 2, 3]}'), PromptError, 'the ID "1.5" is not a whole number'),
    (world('{"id": true, "point": [1, 2, 3]}'), PromptError, "the ID must be a whole number, got true"),
    (world('{"id": null, "point": [1, 2, 3]}'), PromptError, "the ID must be a whole number, got null"),
    (world('{"id": "abc", "point": [1, 2, 3]}'), PromptError, 'prompts[0]: the ID "abc" is not a number; prompt IDs'),
    (world('{"id": NaN, "point": [1, 2, 3]}'), PromptError, "the ID NaN is not a whole number"),
    (world('{"id": 2, "point": [1, 2, 3]}', '{"id": 2.0, "point": [1, 2, 3]}'), PromptError,
     "prompts[1]: id 2 is already used by prompts[0]; each prompt needs its own id"),
    (world('{"id": 2, "point": [1, 2, 3]}', P), PromptError,
     'prompts[1] has no "id", so it gets its position 2, which prompts[0] already uses as id'),
]


def _write(tmp_path: Path, content) -> Path:
    path = tmp_path / "prompts.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("content, error, fragment", BAD_FILES,
                         ids=[f"{i:02d}" for i in range(len(BAD_FILES))])
def test_bad_prompt_file_is_refused_with_one_line_naming_the_file(tmp_path, content, error, fragment):
    path = _write(tmp_path, content)
    with pytest.raises(Exception) as caught:
        read_prompt_file(path)
    assert type(caught.value) is error
    message = str(caught.value)
    assert fragment in message, message
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and len(message) < 400, message


@pytest.mark.parametrize("content, fragment", [
    ('[{"id": 1, "point": [1, 2, 3]}]', "a world prompt file must be a JSON object"),
    ('{"1": {"point": [1, 2, 3]}}', 'not a world prompt file: "format": "lesionlocator-world/1" is missing'),
])
def test_world_flag_requires_a_world_file(tmp_path, content, fragment):
    path = _write(tmp_path, content)
    with pytest.raises(PromptError) as caught:
        read_prompt_file(path, world=True)
    assert type(caught.value) is PromptError and fragment in str(caught.value)


def test_an_unreadable_path_is_a_message_not_a_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "missing.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "dir.json")


def _summary(prompts):
    out = []
    for p in prompts:
        if isinstance(p, VoxelPrompt):
            out.append((p.id, p.kind, p.name, [float(v) for v in p.coords]))
        elif isinstance(p, Point):
            out.append((p.id, "point", p.name, [float(v) for v in p.xyz]))
        else:
            out.append((p.id, "box", p.name, [float(v) for v in (*p.lower, *p.upper)]))
    return out


GOOD_FILES = [
    # upstream, as upstream writes it (strings), and with numbers
    ('{"1": {"point": ["166.01", "361.74", "162.64"]}, "2": {"box": ["146", "189", "316", "409", "114", "234"]}}',
     [(1, "point", "1", [166.01, 361.74, 162.64]), (2, "box", "2", [146, 189, 316, 409, 114, 234])]),
    ('{"3": {"box": [1, 5, "2", 9, 3, 7.5]}, "1": {"point": [0, -1.5, "2e1"]}}',
     [(1, "point", "1", [0, -1.5, 20]), (3, "box", "3", [1, 5, 2, 9, 3, 7.5])]),
    # whole-number keys in other spellings keep their value and their text as name
    ('{"1.0": {"point": [1, 2, 3]}, " 7": {"point": [1, 2, 3]}, "65535": {"point": [1, 2, 3]}}',
     [(1, "point", "1.0", [1, 2, 3]), (7, "point", " 7", [1, 2, 3]), (65535, "point", "65535", [1, 2, 3])]),
    # non-numeric keys: the next free ID above the largest, in file order; the key is the name
    ('{"lesion_b": {"point": [1, 2, 3]}, "4": {"point": [1, 2, 3]}, "lesion_a": {"box": [0, 1, 0, 1, 0, 1]}}',
     [(4, "point", "4", [1, 2, 3]), (5, "point", "lesion_b", [1, 2, 3]), (6, "box", "lesion_a", [0, 1, 0, 1, 0, 1])]),
    ('{"nan": {"point": [1, 2, 3]}, "inf": {"point": [1, 2, 3]}}',
     [(1, "point", "nan", [1, 2, 3]), (2, "point", "inf", [1, 2, 3])]),
    # ... and past 65535 the smallest unused IDs, never a collision
    ('{"65535": {"point": [1, 2, 3]}, "1": {"point": [1, 2, 3]}, "a": {"point": [1, 2, 3]}, "b": {"point": [1, 2, 3]}}',
     [(1, "point", "1", [1, 2, 3]), (2, "point", "a", [1, 2, 3]), (3, "point", "b", [1, 2, 3]),
      (65535, "point", "65535", [1, 2, 3])]),
    # world: points and boxes (corners in any order), LPS mm
    (world('{"id": 1, "point": [1.5, -2, 3]}', '{"id": 2, "box": [[3, 4, 5], [0, 1, 2]]}'),
     [(1, "point", "1", [1.5, -2, 3]), (2, "box", "2", [0, 1, 2, 3, 4, 5])]),
    # world: frame and units may be left out (LPS, mm); "lps" as before; a flat box is fine
    (f'{{{W}, "frame": "lps", "prompts": [{{"id": 9, "point": [1, 2, 3], "name": "liver"}}]}}',
     [(9, "point", "liver", [1, 2, 3])]),
    (f'{{{W}, "prompts": [{{"point": [1, 2, 3]}}, {{"box": [[1, 1, 1], [1, 2, 3]]}}, {{"id": "5", "point": [0, 0, 0]}},'
     f' {{"id": 7.0, "point": ["1", 2, 3]}}]}}',
     [(1, "point", "1", [1, 2, 3]), (2, "box", "2", [1, 1, 1, 1, 2, 3]), (5, "point", "5", [0, 0, 0]),
      (7, "point", "7", [1, 2, 3])]),
    # a byte order mark is fine
    ('\ufeff{"1": {"point": [1, 2, 3]}}', [(1, "point", "1", [1, 2, 3])]),
]


@pytest.mark.parametrize("content, expected", GOOD_FILES, ids=[f"{i:02d}" for i in range(len(GOOD_FILES))])
def test_valid_prompt_files_keep_loading(tmp_path, content, expected):
    assert _summary(read_prompt_file(_write(tmp_path, content))) == expected


def test_world_files_give_world_prompts_and_upstream_files_voxel_prompts():
    w = parse_prompt_json(world('{"id": 1, "point": [1, 2, 3]}', '{"id": 2, "box": [[0, 0, 0], [1, 1, 1]]}'))
    assert [type(p) for p in w] == [Point, Box]
    u = parse_prompt_json('{"1": {"point": [1, 2, 3]}}')
    assert type(u[0]) is VoxelPrompt


@pytest.mark.parametrize("value, expected", [
    (1, 1), (65535, 65535), (np.uint16(7), 7), (np.int64(9), 9), (3.0, 3), ("12", 12), (" 4.0 ", 4)])
def test_check_prompt_id_accepts_whole_numbers_in_range(value, expected):
    assert check_prompt_id(value) == expected


@pytest.mark.parametrize("value, fragment", [
    (0, "the ID 0 is out of range"), (65536, "the ID 65536 is out of range"), (-1, "the ID -1 is out of range"),
    (True, "got true"), (2.5, "the ID 2.5 is not a whole number"), (float("inf"), "out of range"),
    ("x", 'the ID "x" is not a number'), (None, "got null"), ([1], "got [1]")])
def test_check_prompt_id_refuses(value, fragment):
    with pytest.raises(PromptError) as caught:
        check_prompt_id(value, "here")
    assert type(caught.value) is PromptError
    assert str(caught.value).startswith("here: ") and fragment in str(caught.value)
    assert "from 1 to 65535" in str(caught.value)


def test_ids_out_of_range_are_refused_before_they_reach_the_label_image():
    image = Image(np.zeros((8, 8, 8), np.float32))
    assert to_voxel_prompt(VoxelPrompt(65535, "point", [1, 1, 1]), image).id == 65535
    for bad in (0, 70000, -3):
        with pytest.raises(PromptError, match=f"prompt {bad}: the ID {bad} is out of range"):
            to_voxel_prompt(Point(bad, (1.0, 1.0, 1.0)), image)
    with pytest.raises(PromptError, match="the label image has lesion label 70000; prompt IDs are whole numbers"):
        prompts_from_labels(np.full((2, 2, 2), 70000, np.int32), "point")


def _voxel(kind, pid=1):
    return VoxelPrompt(pid, kind, [1, 2, 3] if kind == "point" else [0, 1, 0, 1, 0, 1])


@pytest.mark.parametrize("prompts, kind", [
    ([_voxel("point"), _voxel("point", 2)], "point"),
    ([_voxel("box")], "box"),
    ([_voxel("point"), _voxel("box", 2)], "mixed"),
    ([Point(1, (0, 0, 0)), Point(2, (1, 1, 1))], "point"),
    ([Box(1, (0, 0, 0), (1, 1, 1))], "box"),
    ([Point(1, (0, 0, 0)), Box(2, (0, 0, 0), (1, 1, 1))], "mixed"),
    ([MaskPrompt(1, None)], "mask"),
])
def test_prompt_kind(prompts, kind):
    assert prompt_kind(prompts) == kind
    assert prompt_kind(iter(prompts)) == kind


def test_prompt_kind_against_the_model_type():
    points = parse_prompt_json('{"1": {"point": [1, 2, 3]}, "2": {"point": [4, 5, 6]}}')
    assert check_prompt_kind(points, "point") == "point"
    with pytest.raises(PromptError, match=r"^case01\.json: holds point prompts, but the prompt type is 'box'; "
                       r"run with -t point"):
        check_prompt_kind(points, "box", "case01.json")
    mixed = parse_prompt_json('{"1": {"point": [1, 2, 3]}, "2": {"box": [0, 1, 0, 1, 0, 1]}}')
    with pytest.raises(PromptError, match=r"mixes prompt kinds \(1 point, 1 box\), but one run uses one model "
                       r"\(-t point\)"):
        check_prompt_kind(mixed, "point")
    assert check_prompt_kind([MaskPrompt(1, None)], "prev_mask") == "mask"
    with pytest.raises(PromptError, match="holds mask prompts, but the prompt type is 'box'; run with -t prev_mask"):
        check_prompt_kind([MaskPrompt(1, None)], "box")
    with pytest.raises(PromptError, match="^no prompts$"):
        prompt_kind([])


@pytest.mark.parametrize("n, allow_many, warns, error", [
    (1, False, False, None),
    (100, False, False, None),
    (101, False, True, None),
    (1000, False, True, None),
    (1001, False, False, "case01.json: 1001 prompts, more than the limit of 1000 (each prompt runs the network "
                         "once); pass --allow-many-prompts"),
    (10_000, True, True, None),
])
def test_prompt_count_guard(n, allow_many, warns, error):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if error:
            with pytest.raises(PromptError) as raised:
                check_prompt_count(n, allow_many=allow_many, source="case01.json")
            assert type(raised.value) is PromptError and str(raised.value).startswith(error)
        else:
            assert check_prompt_count(n, allow_many=allow_many, source="case01.json") == n
    many = [w for w in caught if issubclass(w.category, ManyPromptsWarning)]
    assert len(many) == (1 if warns else 0)
    if warns:
        assert f"case01.json: {n} prompts (more than 100)" in str(many[0].message)


def test_prompt_count_guard_takes_the_prompts_themselves():
    with pytest.warns(ManyPromptsWarning, match="150 prompts"):
        assert check_prompt_count([_voxel("point", i) for i in range(1, 151)]) == 150


def test_reading_prompts_is_cheap_and_imports_neither_torch_nor_the_image_libraries(tmp_path):
    many = {str(i): {"point": [str(i % 50), "1.5", 2]} for i in range(1, 5001)}
    path = _write(tmp_path, json.dumps(many))
    code = (f"import sys, time; t = time.perf_counter(); from LesionLocatorLib.prompts import read_prompt_file; "
            f"p = read_prompt_file({str(path)!r}); t = time.perf_counter() - t; "
            f"print(len(p), [m for m in ('torch', 'SimpleITK', 'scipy', 'nnunetv2') if m in sys.modules], t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split(maxsplit=2)
    assert out[0] == "5000" and out[1] == "[]", out
    assert float(out[2]) < 2.0, out  # import + 5000 prompts; about 0.1 s on a laptop
    start = time.perf_counter()
    assert len(read_prompt_file(path)) == 5000
    assert time.perf_counter() - start < 1.0


def test_max_prompt_id_matches_the_label_image_type():
    assert MAX_PROMPT_ID == np.iinfo(np.uint16).max
