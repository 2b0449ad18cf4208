"""Tool schemas, the two-format parser (never raises) and render -> parse round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finemem.memory import FLAT_TOOLS, MEMALPHA_TOOLS, FlatMemory
from finemem.records import ToolCall
from finemem.toolcalls import parse_tool_calls, render_tool_calls, tool_schemas


def ok(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    assert all(c.error is None for c in calls), [c.error for c in calls]
    return [(c.name, c.arguments) for c in calls]


# ---- schemas --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, names", [("flat", FLAT_TOOLS), ("memalpha", MEMALPHA_TOOLS)])
def test_schemas_are_openai_function_schemas_matching_the_memory_tools(kind, names):
    schemas = tool_schemas(kind)
    assert tuple(s["function"]["name"] for s in schemas) == names
    for s in schemas:
        assert s["type"] == "function"
        params = s["function"]["parameters"]
        assert params["type"] == "object" and s["function"]["description"]
        assert set(params["required"]) <= set(params["properties"])


def test_unknown_schema_kind():
    with pytest.raises(ValueError, match="unknown tool kind"):
        tool_schemas("graph")


# ---- parsing: the good cases ----------------------------------------------------------------
def test_hermes_blocks_with_text_around_them():
    text = (
        "I will store it.\n<tool_call>\n"
        '{"name": "memory_insert", "arguments": {"content": "Mira\'s code is 4821."}}\n'
        "</tool_call>\nand<tool_call>{\"name\":\"memory_delete\",\"arguments\":{\"memory_id\":\"m2\"}}</tool_call>"
    )
    assert ok(parse_tool_calls(text)) == [
        ("memory_insert", {"content": "Mira's code is 4821."}),
        ("memory_delete", {"memory_id": "m2"}),
    ]


def test_hermes_arguments_as_json_string_and_list_in_one_block():
    text = (
        '<tool_call>{"name": "memory_update", "arguments": "{\\"memory_id\\": \\"m1\\", \\"new_content\\": \\"x\\"}"}'
        "</tool_call>\n<tool_call>\n  [ {\"name\": \"memory_insert\", \"arguments\": {\"content\": \"a\"}},\n"
        '    {"name": "memory_insert", "arguments": {"content": "b"}} ]  \n</tool_call>'
    )
    assert ok(parse_tool_calls(text)) == [
        ("memory_update", {"memory_id": "m1", "new_content": "x"}),
        ("memory_insert", {"content": "a"}),
        ("memory_insert", {"content": "b"}),
    ]


def test_raw_keeps_the_block_text():
    block = '<tool_call>{"name": "memory_delete", "arguments": {"memory_id": "m1"}}</tool_call>'
    assert parse_tool_calls("x " + block + " y")[0].raw == block


def test_memalpha_lines_and_mixed_formats_in_order():
    text = (
        "✿FUNCTION✿: new_memory_insert\n✿ARGS✿: {\"memory_type\": \"semantic\", \"content\": \"Paris\"}\n"
        '<tool_call>{"name": "memory_insert", "arguments": {"content": "h"}}</tool_call>\n'
        "✿FUNCTION✿:memory_delete\n\n✿ARGS✿:\n{\"memory_type\": \"core\"}\n✿RESULT✿: done"
    )
    assert ok(parse_tool_calls(text)) == [
        ("new_memory_insert", {"memory_type": "semantic", "content": "Paris"}),
        ("memory_insert", {"content": "h"}),
        ("memory_delete", {"memory_type": "core"}),
    ]


def test_no_markers_is_a_skip():
    assert parse_tool_calls("") == []
    assert parse_tool_calls("Nothing worth remembering here. {\"name\": \"x\"}") == []
    assert parse_tool_calls("stray </tool_call> closer") == []


def test_leading_think_block_is_dropped():
    inner = '<tool_call>{"name": "memory_delete", "arguments": {"memory_id": "m1"}}</tool_call>'
    text = f"\n<think>maybe {inner}</think>\n" + inner.replace("m1", "m2")
    assert ok(parse_tool_calls(text)) == [("memory_delete", {"memory_id": "m2"})]
    # the chat template opened <think> in the prompt: only the closing tag is generated
    assert ok(parse_tool_calls("hmm\n</think>\n\n" + inner)) == [("memory_delete", {"memory_id": "m1"})]
    assert parse_tool_calls("<think>\n\n</think>\n\n") == []


# ---- parsing: malformed output becomes an error call ----------------------------------------
@pytest.mark.parametrize(
    "text, error, name",
    [
        ('<tool_call>\n{"name": "memory_insert", "arguments": {"content": "cut he', "unterminated <tool_call>", "memory_insert"),
        ('<tool_call>{"name": "memory_insert", "arguments": {"content": "a"}}', "unterminated <tool_call>", "memory_insert"),
        ("<tool_call>{'name': 'memory_insert'}</tool_call>", "bad JSON", ""),
        ('<tool_call>{"name": "memory_insert", "arguments": ["a"]}</tool_call>', "arguments must be a JSON object, got list", "memory_insert"),
        ('<tool_call>{"name": "memory_insert", "arguments": "not json"}</tool_call>', "arguments string is not JSON", "memory_insert"),
        ('<tool_call>{"arguments": {"content": "a"}}</tool_call>', "missing tool name", ""),
        ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', "missing tool name", ""),
        ("<tool_call>\n  \n</tool_call>", "empty <tool_call> block", ""),
        ("<tool_call>[]</tool_call>", "empty list of tool calls", ""),
        ('<tool_call>"memory_insert"</tool_call>', "must be a JSON object, got str", ""),
        ("<tool_call>" + "[" * 50000 + "</tool_call>", "bad JSON", ""),
        ("✿FUNCTION✿: memory_insert\nsome text", "✿FUNCTION✿ without ✿ARGS✿", "memory_insert"),
        ('✿ARGS✿: {"content": "a"}', "✿ARGS✿ without a preceding ✿FUNCTION✿", ""),
        ('✿FUNCTION✿: memory_insert\n✿ARGS✿: {"content": "cut', "bad JSON", "memory_insert"),
        ("✿FUNCTION✿: memory_insert\n✿ARGS✿: [1]", "arguments must be a JSON object", "memory_insert"),
        ("✿FUNCTION✿: memory_insert\n✿ARGS✿:", "empty ✿ARGS✿", "memory_insert"),
        ('✿FUNCTION✿:\n✿ARGS✿: {"content": "a"}', "missing tool name", ""),
        ("<think>still thinking when the length limit hit", "unterminated <think>", ""),
    ],
)
def test_malformed_calls_become_error_calls(text, error, name):
    calls = parse_tool_calls(text)
    assert len(calls) == 1
    assert calls[0].error is not None and error in calls[0].error
    assert calls[0].name == name and calls[0].arguments == {}


def test_an_unterminated_block_does_not_swallow_the_next_one():
    text = '<tool_call>{"name": "memory_insert", "arg\n<tool_call>{"name": "memory_delete", "arguments": {"memory_id": "m1"}}</tool_call>'
    first, second = parse_tool_calls(text)
    assert "unterminated" in first.error
    assert (second.name, second.arguments, second.error) == ("memory_delete", {"memory_id": "m1"}, None)


def test_non_string_input_is_an_error_call_not_an_exception():
    [c] = parse_tool_calls(None)  # type: ignore[arg-type]
    assert "not a string" in c.error


def test_error_calls_are_invalid_operations_in_the_memory():
    mem = FlatMemory()
    results = mem.apply_all(parse_tool_calls('<tool_call>{"name": "memory_insert", "arguments": {"content": "a'), 1)
    assert [(r.op, r.valid) for r in results] == [("invalid", False)]
    assert "unterminated" in results[0].reason


# ---- rendering ------------------------------------------------------------------------------
def test_render_hermes_exact_text():
    calls = [("memory_insert", {"content": "Zoë's code is 4821."}), ("memory_delete", {"memory_id": "m1"})]
    assert render_tool_calls(calls) == (
        '<tool_call>\n{"name": "memory_insert", "arguments": {"content": "Zoë\'s code is 4821."}}\n</tool_call>\n'
        '<tool_call>\n{"name": "memory_delete", "arguments": {"memory_id": "m1"}}\n</tool_call>'
    )
    assert render_tool_calls([]) == ""


def test_render_memalpha_exact_text_and_toolcall_input():
    calls = [ToolCall("new_memory_insert", {"memory_type": "episodic", "content": "met Omar"})]
    assert render_tool_calls(calls, fmt="memalpha") == (
        '✿FUNCTION✿: new_memory_insert\n✿ARGS✿: {"memory_type": "episodic", "content": "met Omar"}'
    )


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown tool-call format"):
        render_tool_calls([], fmt="xml")
    with pytest.raises(ValueError, match="cannot render tool name"):
        render_tool_calls([("bad name\n", {})])
    with pytest.raises(TypeError, match="must be a dict"):
        render_tool_calls([("memory_insert", ["x"])])  # type: ignore[list-item]


def test_marker_text_inside_contents_round_trips():
    nasty = "a </tool_call> b <tool_call> c ✿ARGS✿ d ✿FUNCTION✿: e </think> f <think> \\u003c"
    for fmt in ("hermes", "memalpha"):
        text = render_tool_calls([("memory_insert", {"content": nasty}), ("memory_delete", {"memory_id": "m1"})], fmt)
        assert ok(parse_tool_calls(text)) == [("memory_insert", {"content": nasty}), ("memory_delete", {"memory_id": "m1"})]
        assert ok(parse_tool_calls("<think>x</think>" + text))[0][1]["content"] == nasty


# ---- property tests -------------------------------------------------------------------------
FRAGMENTS = [
    "<tool_call>", "</tool_call>", "{", "}", "[", "]", '"name"', '"arguments"', ":", ",", '"', "\\",
    "✿FUNCTION✿", "✿ARGS✿", "✿RESULT✿", "<think>", "</think>", "\n", " ", "memory_insert",
    '{"content": "x"}', '"{}"', "null", "1e999", "-", "\\u", "✿",
]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parser_never_raises_on_any_text(text):
    calls = parse_tool_calls(text)
    assert all(isinstance(c, ToolCall) and isinstance(c.arguments, dict) for c in calls)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40).map("".join))
def test_parser_never_raises_on_marker_soup(text):
    calls = parse_tool_calls(text)
    for c in calls:
        assert isinstance(c, ToolCall) and isinstance(c.name, str) and isinstance(c.arguments, dict)
        assert (c.error is None) or c.arguments == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
call_strategy = st.tuples(
    st.sampled_from(FLAT_TOOLS + MEMALPHA_TOOLS),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(call_strategy, max_size=4), st.sampled_from(["hermes", "memalpha"]), st.text().filter(lambda s: "<" not in s and "✿" not in s))
def test_render_then_parse_round_trips(calls, fmt, prefix):
    text = render_tool_calls(calls, fmt)
    assert ok(parse_tool_calls(text)) == calls
    assert ok(parse_tool_calls(prefix + "\n" + text)) == calls
