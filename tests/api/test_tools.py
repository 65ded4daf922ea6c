"""Tool calling's pieces, without a model: the parser that finds calls in an answer as it streams, the structural tag
each tool choice compiles to (and that xgrammar accepts the answers it should and refuses the others), and how a
conversation with tools reaches a chat template that takes tools and one that does not."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import xgrammar as xgr

from service.api import tool_parser, tools
from service.api.gen.loraserve.v1 import inference_pb2 as pb
from service.engine.outputs import FinalOutput, RequestOutput, Timings, Usage
from service.engine.request import RequestSpec
from service.engine.sampling import SamplingParams
from service.engine.types import FinishReason
from tests.tiny_models import template_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
NAMES = frozenset({"get_weather", "get_time"})
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'


def final(text: str = "", reason: FinishReason = FinishReason.EOS) -> FinalOutput:
    spec = RequestSpec("r", (1, 2), SamplingParams())
    return FinalOutput(spec, text, (), reason, Usage(2, 0, 1), Timings(0, 0, 0, 0, None), 0)


def run(pieces: list[str], reason: FinishReason = FinishReason.EOS) -> tuple[list[str], RequestOutput]:
    """Feed the answer's pieces through a parser as outputs; (the texts released per output, the final output)."""
    parser = tool_parser.ToolCallParser(NAMES)
    released = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        out = RequestOutput("r", [k], piece, final=final("".join(pieces), reason) if last else None)
        parser.apply(out)
        released.append(out.new_text)
    return released, out


def splits(text: str) -> list[list[str]]:
    """The text whole, a character at a time, and cut at every position in two."""
    return [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]


@pytest.mark.parametrize("pieces", splits("Let me look. " + CALL))
def test_text_before_a_call_streams_and_the_call_comes_whole_at_the_end_however_the_text_is_cut(pieces):
    released, last = run(pieces)
    assert "".join(released) == "Let me look. "  # never a piece of `<tool_call>`
    assert [(c.name, json.loads(c.arguments)) for c in last.tool_calls] == [("get_weather", {"city": "Paris"})]
    # the final text is what the answer says besides its calls, without the white space around them
    assert last.final.text == "Let me look." and last.tool_calls[0].id.startswith("call_")


def test_a_text_that_only_looks_like_the_start_of_a_call_is_released_once_it_is_not():
    released, last = run(["a <tool", "box> b"])
    assert released == ["a ", "<toolbox> b"] and last.tool_calls == [] and last.final.text == "a <toolbox> b"


def test_several_calls_with_text_between_and_after_them():
    released, last = run([CALL, "\n", CALL2, "\nDone."])
    assert [c.name for c in last.tool_calls] == ["get_weather", "get_time"]
    assert len({c.id for c in last.tool_calls}) == 2
    assert "".join(released) == "\nDone." and last.final.text == "Done."  # what it says besides its calls


def test_an_answer_of_calls_alone_has_no_text():
    released, last = run([CALL, "\n", CALL2, "\n"])
    assert "".join(released) == "" and last.final.text == "" and len(last.tool_calls) == 2


def test_a_call_cut_short_keeps_the_arguments_it_has():
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    released, last = run([CALL, "\n", cut], FinishReason.LENGTH)
    assert [(c.name, c.arguments) for c in last.tool_calls] == [("get_weather", '{"city": "Paris"}'),
                                                              ("get_weather", '{"city": "Par')]
    assert "".join(released) == "" and last.final.text == ""
    # cut right after its opening: a call with no arguments yet, as one cut a character later has "{"
    for cut in ('<tool_call>\n{"name": "get_time", "arguments": ', '<tool_call>\n{"name": "get_time", "arguments": {'):
        released, last = run([CALL, "\n", cut], FinishReason.LENGTH)
        assert [c.arguments for c in last.tool_calls] == ['{"city": "Paris"}', cut[cut.index("arguments") + 12:]]
        assert "".join(released) == "" == last.final.text
    # cut after its arguments, in its close: the arguments are whole
    released, last = run([CALL2[:-8]], FinishReason.LENGTH)
    assert [(c.name, c.arguments) for c in last.tool_calls] == [("get_time", '{"city": "Oslo"}')]


@pytest.mark.parametrize("bad", [
    '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>',  # not one of the tools
    '<tool_call>\nget_weather(city="Paris")\n</tool_call>',  # not the format
])
def test_text_that_only_looks_like_a_call_stays_text_and_the_calls_before_it_count(bad):
    released, last = run([CALL, "\n", bad])
    assert [c.name for c in last.tool_calls] == ["get_weather"]
    assert "".join(released) == bad == last.final.text  # (the line break between calls is no text)


@pytest.mark.parametrize("pieces", splits("Sure. " + CALL + "\n" + CALL2 + "\nDone."))
def test_calls_stream_as_they_are_written_and_join_to_the_final_calls(pieces):
    """Each call's opening (index, id, name) comes once its name is written, then its arguments piece by piece; the
    pieces joined are the final call's arguments, however the text is cut."""
    parser = tool_parser.ToolCallParser(NAMES)
    deltas, released = [], []
    for k, piece in enumerate(pieces):
        out = RequestOutput("r", [k], piece, final=final() if k == len(pieces) - 1 else None)
        parser.apply(out)
        deltas.extend(out.tool_call_deltas or [])
        released.append(out.new_text)
    calls = out.tool_calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("get_time", {"city": "Oslo"})]
    for c_index, call in enumerate(calls):
        mine = [d for d in deltas if d.index == c_index]
        assert (mine[0].id, mine[0].name, mine[0].arguments) == (call.id, call.name, "")
        assert all(d.id == "" and d.name == "" for d in mine[1:])
        assert "".join(d.arguments for d in mine) == call.arguments
    assert "".join(released) == "Sure. \nDone." and out.final.text == "Sure. \nDone."


TRICKY = '{"note": "a } and }\\n</tool_call> \\"quoted\\" {", "list": [{"x": [1, {"y": "]"}]}], "e": "\\\\"}'


@pytest.mark.parametrize("pieces", splits(f'<tool_call>\n{{"name": "get_time", "arguments": {TRICKY}}}\n</tool_call>'))
def test_arguments_end_where_their_object_ends_not_at_a_brace_or_tag_inside_a_string(pieces):
    deltas = []
    parser = tool_parser.ToolCallParser(NAMES)
    for k, piece in enumerate(pieces):
        out = RequestOutput("r", [k], piece, final=final() if k == len(pieces) - 1 else None)
        parser.apply(out)
        deltas.extend(out.tool_call_deltas or [])
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_time", TRICKY)]
    assert "".join(d.arguments for d in deltas) == TRICKY and json.loads(TRICKY)["e"] == "\\"
    assert out.final.text == ""


@pytest.mark.parametrize("pieces", splits(CALL + "a " + CALL2 + "b"))
def test_the_text_between_calls_does_not_depend_on_how_it_was_cut(pieces):
    released, last = run(pieces)
    assert "".join(released) == "a b" == last.final.text and len(last.tool_calls) == 2


def test_arguments_that_are_no_object_make_no_call():
    text = '<tool_call>\n{"name": "get_time", "arguments": "now"}\n</tool_call>'
    released, last = run([text])
    assert last.tool_calls == [] and last.final.text == text == "".join(released)


def test_parameters_is_taken_for_arguments():
    text = '<tool_call>{"name": "get_time", "parameters": {"city": "Rome"}}</tool_call>'
    said, calls = tool_parser.split_calls(text, NAMES)
    assert said == "" and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"city": "Rome"}


@pytest.mark.parametrize("reason", [FinishReason.CANCELLED, FinishReason.ERROR])
def test_an_answer_that_never_finished_is_not_parsed(reason):
    released, last = run(["ok ", CALL], reason)
    assert last.tool_calls is None and last.final.text == "ok " + CALL and released == ["ok ", ""]


# ---- the structural tags ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiler():
    """A byte-level vocabulary of every single byte and a few longer pieces, so any text is spellable."""
    vocab = [bytes([b]).decode("latin-1") for b in range(256)] + ["<tool_call>", "</tool_call>", '{"', '":']
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW)
    return xgr.GrammarCompiler(info)


def accepts(compiler, toolset: tools.ToolSet, text: str) -> bool:
    fmt = toolset.format()
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(fmt.text))
    return (matcher.accept_string(text) if text else True) and matcher.is_completed()


def toolset(mode: str, function: str = "", single: bool = False) -> tools.ToolSet:
    return tools.ToolSet((tools.Tool("get_weather", "", WEATHER), tools.Tool("get_time", "", WEATHER)), mode,
                         function, single)


def grammar_call(name: str = "get_weather", city: str = "Paris") -> str:
    # the exact text the tag's begin and end spell, with the JSON of the arguments as the model writes it
    return f'<tool_call>\n{{"name": "{name}", "arguments": {{"city": "{city}"}}}}\n</tool_call>'


@pytest.mark.parametrize("mode, text, ok", [
    ("auto", "The capital of France is Paris.", True),  # free text
    ("auto", "", True),
    ("auto", "Sure. " + grammar_call() + "\n", True),
    ("auto", grammar_call() + grammar_call("get_time"), True),
    ("auto", '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call>', False),  # not a tool
    ("auto", '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>', False),  # schema
    ("required", "", False),  # at least one call
    ("required", "Paris.", False),  # text is no call
    ("required", grammar_call() + "\n", True),
    ("required", grammar_call() + "\n" + grammar_call("get_time") + "\n", True),
    ("required", grammar_call() + "\nDone.", False),  # calls and nothing else
    ("function", grammar_call(), True),
    ("function", grammar_call("get_time"), False),  # only the named one
    ("function", grammar_call() + grammar_call(), False),  # one call
])
def test_each_tool_choice_accepts_what_it_should(compiler, mode, text, ok):
    assert accepts(compiler, toolset(mode, "get_weather" if mode == "function" else ""), text) is ok


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_a_single_call_choice_takes_no_second_call(compiler, mode):
    end = "\n" if mode == "required" else ""
    assert accepts(compiler, toolset(mode, single=True), grammar_call() + end)
    assert not accepts(compiler, toolset(mode, single=True), grammar_call() + end + grammar_call() + end)


def test_mode_none_has_no_format_and_no_parser():
    assert toolset("none").format() is None and toolset("none").parser() is None


def test_every_tool_schema_is_in_the_format_and_too_large_a_format_is_refused():
    fmt = json.loads(toolset("auto").format().text)
    assert [t["content"]["json_schema"] for t in fmt["format"]["tags"]] == [WEATHER, WEATHER]
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(700)}}
    with pytest.raises(ValueError, match=r"messages.tools make a format of \d+ bytes .* at most 65536"):
        tools.ToolSet((tools.Tool("f", "", big),), "auto").format()


@pytest.mark.parametrize("parameters", [{}, {"properties": {"city": {"type": "string"}}}])
def test_parameters_without_a_type_are_an_object_schema(compiler, parameters):
    """Else the grammar would let a call's arguments be any JSON value, which the parser then refuses."""
    ts = tools.tool_set(pb.ChatMessages(tools=[pb.Tool(name="get_weather", parameters=json.dumps(parameters))],
                                        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)))
    assert ts.tools[0].parameters == {"type": "object", **parameters}
    for arguments, ok in (("42", False), ('"x"', False), ("[1]", False), ('{"city": "Oslo"}', True)):
        text = f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>\n'
        assert accepts(compiler, ts, text) is ok, arguments


def test_tool_set_reads_the_proto_and_defaults_to_auto_with_no_arguments():
    ts = tools.tool_set(pb.ChatMessages(tools=[pb.Tool(name="f", description="does f"), pb.Tool(
        name="g", parameters=json.dumps(WEATHER))]))
    assert ts.mode == "auto" and ts.tools[0].parameters == tools.NO_ARGUMENTS and ts.tools[1].parameters == WEATHER
    assert ts.tools[0].openai() == {"type": "function", "function": {"name": "f", "description": "does f",
                                                                     "parameters": tools.NO_ARGUMENTS}}
    assert tools.tool_set(pb.ChatMessages()) is None


# ---- the conversation, as a chat template reads it ---------------------------------------------------------
def history() -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Weather in Paris?"),
            pb.ChatMessage(role=pb.CHAT_ROLE_ASSISTANT, tool_calls=[pb.ToolCall(
                id="call_1", name="get_weather", arguments='{"city": "Paris"}')]),
            pb.ChatMessage(role=pb.CHAT_ROLE_TOOL, tool_call_id="call_1", content='{"c": 18}')]


ROLES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant",
         pb.CHAT_ROLE_TOOL: "tool"}


def test_messages_carry_their_calls_as_objects_and_a_result_names_its_tool():
    messages = tools.chat_messages(history(), ROLES)
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert messages[2] == {"role": "tool", "content": '{"c": 18}', "tool_call_id": "call_1", "name": "get_weather"}


# A template that renders tools and calls itself (the shape of Hermes-style templates)
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>TOOLS {% for t in tools %}{{ t.function.name }};{% endfor %}"
    "Call them as <tool_call>...</tool_call>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_only_a_template_that_reads_tools_and_writes_tool_call_renders_them_itself():
    assert tools.template_calls_tools(TOOLS_TEMPLATE, template_tokenizer(TOOLS_TEMPLATE).template_takes_tools)
    # reads tools but asks for another format (as Llama 3.1's does): the model is told ours instead
    other = TOOLS_TEMPLATE.replace("<tool_call>", "").replace("TOOLS", "Respond with JSON")
    assert template_tokenizer(other).template_takes_tools and not tools.template_calls_tools(other, True)
    assert not tools.template_calls_tools(PLAIN_TEMPLATE, template_tokenizer(PLAIN_TEMPLATE).template_takes_tools)


def test_a_template_that_takes_tools_gets_them_and_the_calls_as_they_are():
    tok = template_tokenizer(TOOLS_TEMPLATE)
    assert tok.template_takes_tools
    messages, listed = tools.for_template(tools.chat_messages(history(), ROLES), toolset("auto"), True)
    text = tok.apply_chat_template(messages, tools=listed)
    # (trim_blocks, as transformers renders, takes the line break after each block tag)
    assert text.startswith("<|system|>TOOLS get_weather;get_time;Call them as <tool_call>...</tool_call>\n"
                           "<|user|>Weather in Paris?")
    assert text.endswith('<|assistant|>CALL get_weather {"city": "Paris"}<|tool|>{"c": 18}<|assistant|>')


def test_a_template_without_tools_gets_a_system_message_and_calls_written_as_the_model_is_asked_to():
    tok = template_tokenizer(PLAIN_TEMPLATE)
    assert not tok.template_takes_tools
    messages, listed = tools.for_template(tools.chat_messages(history(), ROLES), toolset("auto"), False)
    assert listed is None
    text = tok.apply_chat_template(messages, tools=listed)
    system, rest = text.split("\n<|user|>", 1)
    assert system.startswith("<|system|>You can call functions") and '"name": "get_time"' in system
    assert json.dumps(WEATHER) in system and "<tool_call>" in system
    assert f'<|assistant|>{tool_parser.CALL_BEGIN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n' \
           f'{tool_parser.CALL_END}\n' in rest
    assert '<|tool|><tool_response>\n{"c": 18}\n</tool_response>' in rest


def test_a_last_turn_without_tools_still_shows_the_earlier_calls_and_results():
    """A conversation's last turn often offers no tools: its earlier calls and results are written all the same."""
    messages, listed = tools.for_template(tools.chat_messages(history(), ROLES), None, False)
    assert listed is None and [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["content"] == f'{tool_parser.CALL_BEGIN}\n{{"name": "get_weather", "arguments": {{"city": ' \
                                     f'"Paris"}}}}\n{tool_parser.CALL_END}'
    assert messages[2]["content"] == '<tool_response>\n{"c": 18}\n</tool_response>'
    plain = tools.chat_messages(history()[:1], ROLES)
    assert tools.for_template(plain, None, False) == (plain, None)  # a conversation without calls is as it was


def test_the_tools_join_a_system_message_the_conversation_has():
    first = pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="Be brief.")
    messages, _ = tools.for_template(tools.chat_messages([first, *history()], ROLES), toolset("none"), False)
    assert messages[0]["content"].startswith("Be brief.\n\nYou can call functions")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]


def test_the_final_keeps_all_but_its_text():
    before = final(CALL)
    out = RequestOutput("r", [1], CALL, final=before)
    tool_parser.ToolCallParser(NAMES).apply(out)
    assert out.final == replace(before, text="") and before.text == CALL


def test_the_python_client_takes_calls_as_a_response_gave_them_or_as_openai_does():
    from service.client import build_request

    got = pb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    openai_shaped = {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    req = build_request(pb.GenerateRequest, messages=[
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "tool_calls": [got, openai_shaped, {"name": "get_time", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}, {"name": "get_time"}],
        tool_choice="get_weather", parallel_tool_calls=False)
    calls = req.messages.messages[1].tool_calls
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "get_time", "{}"),
        ("", "get_time", '{"city": "Oslo"}')]
    assert req.messages.messages[2].tool_call_id == "call_1"
    assert [(t.name, t.parameters) for t in req.messages.tools] == [("get_weather", json.dumps(WEATHER)),
                                                                   ("get_time", "")]
    assert req.messages.tool_choice == pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="get_weather",
                                                     single_call=True)
    with pytest.raises(ValueError, match="tools and continue_final_message need a chat"):
        build_request(pb.GenerateRequest, "t5", tools=[{"name": "f"}])
    with pytest.raises(ValueError, match=r"tools\[0\] has no name"):
        build_request(pb.GenerateRequest, "t5", chat=True, tools=[{"description": "f"}])
