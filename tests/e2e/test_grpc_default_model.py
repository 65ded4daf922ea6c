"""The real server on the embedded default model, over a real socket: one server for the module."""

from __future__ import annotations

import signal

import pytest

from service.client import LoraServeClient
from tests.api.serve_process import ServeProcess, cli

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served():
    proc = ServeProcess("--max-num-seqs", "4", "--kv-cache-gib", "0.25", "--drain-grace-s", "10",
                        ready_timeout=600)
    yield proc
    code = proc.stop(signal.SIGTERM, timeout=120)
    proc.kill()
    assert code == 0, "\n".join(proc.lines[-20:])


def test_unary_and_stream_answer_paris(served):
    with LoraServeClient(served.address, timeout=300) as c:
        r = c.generate(QUESTION, chat=True, temperature=0, max_tokens=24)
        assert "Paris" in r.text, r.text
        assert r.usage.input_tokens > 5 and r.usage.output_tokens == len(r.token_ids)
        streamed = "".join(c.generate_stream(QUESTION, chat=True, temperature=0, max_tokens=24))
        assert streamed == r.text


def test_loraserve_call(served):
    out = cli("call", "--target", served.address, "--prompt", QUESTION, "--temperature", "0",
              "--max-tokens", "24", "--timeout", "300", timeout=400)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("The capital of France is Paris")
    streamed = cli("call", "--target", served.address, "--prompt", QUESTION, "--temperature", "0",
                   "--max-tokens", "24", "--stream", "--timeout", "300", timeout=400)
    assert streamed.returncode == 0 and streamed.stdout == out.stdout


def test_prompt_logprobs_score_a_true_sentence_above_a_false_one(served):
    """Scoring a text with the default model (what an evaluation of an adapter does): the model puts " Paris" first
    after "The capital of France is", and the true sentence is more likely than the same sentence with Rome."""
    with LoraServeClient(served.address, timeout=300) as c:
        def score(text: str):
            return c.generate(text, temperature=0, max_tokens=1, prompt_logprobs=1).prompt_logprobs

        true, false = score("The capital of France is Paris."), score("The capital of France is Rome.")
        paris = next(lp for lp in true if lp.token.strip() == "Paris")
        assert paris.top_logprobs[0].token_id == paris.token_id, paris
        assert sum(lp.logprob for lp in true) > sum(lp.logprob for lp in false) + 2


WEATHER_TOOL = {"name": "get_weather", "description": "Get the current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                               "required": ["city"]}}


def test_a_tool_call_over_grpc_and_the_cli(served, tmp_path):
    """The default model's template takes no tools: they reach it in a system message, and the call it is asked for
    comes back parsed, with arguments that follow the tool's schema; unary, streamed and through the CLI alike."""
    import json

    from service.api.gen.loraserve.v1 import inference_pb2 as pb

    ask = "What's the weather like in Paris today?"
    with LoraServeClient(served.address, timeout=300) as c:
        r = c.generate(ask, chat=True, tools=[WEATHER_TOOL], tool_choice="get_weather", temperature=0, max_tokens=48)
        assert r.finish_reason == pb.FINISH_REASON_TOOL_CALLS and r.text == "", r
        (call,) = r.tool_calls
        assert call.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.arguments) == {"city": "Paris"}
        messages = list(c.generate_stream_messages(ask, chat=True, tools=[WEATHER_TOOL], tool_choice="get_weather",
                                                   temperature=0, max_tokens=48))
        assert "".join(m.text for m in messages) == ""  # the call's text is never streamed as text
        assert [m.tool_calls for m in messages[:-1]] == [[]] * (len(messages) - 1)
        assert [(t.name, t.arguments) for t in messages[-1].tool_calls] == [(call.name, call.arguments)]
        deltas = [d for m in messages for d in m.tool_call_deltas]  # the call as it was written
        assert deltas[0].name == "get_weather" and deltas[0].id == messages[-1].tool_calls[0].id
        assert len(deltas) > 2 and "".join(d.arguments for d in deltas) == call.arguments
        assert messages[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
        # the tools are in the prompt: Tokenize counts them as Generate does
        assert r.usage.input_tokens > c.generate(ask, chat=True, max_tokens=1).usage.input_tokens + 50
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([{"type": "function", "function": WEATHER_TOOL}]))
    out = cli("call", "--target", served.address, "--prompt", ask, "--tools", str(tools_file), "--tool-choice",
              "get_weather", "--temperature", "0", "--max-tokens", "48", "--timeout", "300", timeout=400)
    assert out.returncode == 0, out.stderr
    assert out.stdout == 'tool_call get_weather {"city": "Paris"}\n'  # an answer of a call alone: just the call


def test_an_answer_begun_by_the_caller_goes_on_and_a_kept_stop_string_ends_it(served):
    with LoraServeClient(served.address, timeout=300) as c:
        r = c.generate(messages=[{"role": "user", "content": QUESTION + " Answer in JSON."},
                                 {"role": "assistant", "content": '{"capital": "'}],
                       continue_final_message=True, temperature=0, max_tokens=16)
        assert r.text.startswith('Paris"'), r.text  # only what follows the prefill
        kept = c.generate(QUESTION, chat=True, temperature=0, max_tokens=24, stop=["Paris"],
                          include_stop_str_in_output=True)
        cut = c.generate(QUESTION, chat=True, temperature=0, max_tokens=24, stop=["Paris"])
        assert kept.text == cut.text + "Paris" and kept.text.endswith("France is Paris"), kept.text
