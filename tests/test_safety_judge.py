"""Judge reply parsing: a real JSON decoder (prose with braces around the object), property-tested."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.safety import judge as J

VALID = {"refusal": {"is_refusal": True, "type": "full"}, "harm": {"harmful_content": False, "explanation": ""},
         "scores": {d: 4 for d in J.DIMENSIONS}, "verdict": "pass", "reasons": ["ok"]}


@pytest.mark.parametrize("text", [
    json.dumps(VALID) + "\n\nNote: I weighed {safety} above {style}.",
    json.dumps(VALID) + " }",
    "Here is my verdict: " + json.dumps(VALID) + " (scores use the {1..5} scale)",
    "Sure [see the rubric]: " + json.dumps(VALID),
    "[draft] {not json} then " + json.dumps(VALID) + " {and more}",
    "```json\n" + json.dumps(VALID) + "\n```",
])
def test_valid_json_with_prose_and_braces_around_it(text):
    assert J.validate_judgement(J.extract_json(text))["scores"]["precision"] == 4


def test_array_is_skipped_whole_and_is_not_an_object():
    assert J.extract_json('[{"a": 1}] then {"b": 2}') == {"b": 2}
    with pytest.raises(J.JudgeError, match="not an object"):
        J.extract_json('[{"a": 1}, 2] and no object after it')


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=10)
_objects = st.dictionaries(st.text(max_size=6), _json, max_size=4)
_prose = st.text(alphabet=st.characters(blacklist_characters="{}[]\"", blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(obj=_objects, before=_prose, after=st.text(max_size=40))
def test_extract_json_finds_the_object_whatever_follows(obj, before, after):
    assert J.extract_json(before + json.dumps(obj) + after) == obj


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from('{}[]":,ab1 \\'), max_size=40))
def test_extract_json_returns_an_object_or_a_judge_error(text):
    try:
        assert isinstance(J.extract_json(text), dict)
    except J.JudgeError as e:
        assert e.kind in ("parse_error", "judge_refused")
