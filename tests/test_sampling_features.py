"""Penalties, min_new_tokens, ignore_eos, logprobs, n samples, token-id prompts and chat messages: the pure
functions against hand-computed examples, and the server's output against slow references (a plain forward pass
per step, transformers' log_softmax, the rule written out in Python)."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunefusion.server.engines.base import FinishReason, SamplingParams
from prunefusion.server.engines.sampling import apply_penalties, token_logprobs
from prunefusion.server.engines.text import IncrementalText
from prunefusion_client.v1 import text_generation_pb2 as pb
from prunefusion_client.v1 import text_generation_pb2_grpc as pb_grpc

PROMPT = "The os module"


# ---- pure ------------------------------------------------------------------------------------------------------
def test_penalties_match_a_hand_computed_example():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(5, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    # prompt saw token 1; the output so far is 3, 3, 2
    out = apply_penalties(logits, [params], [([1], [3, 3, 2])], eos_ids=frozenset())
    # repetition (seen: 1, 2, 3): 2.0 stays, -1 -> -2, 0.5 -> 0.25, 3 -> 1.5, -2 stays
    # then frequency/presence over the output: token 3 counted twice (-0.5 - 0.5), token 2 once (-0.25 - 0.5)
    assert out.tolist() == [[2.0, -2.0, 0.25 - 0.75, 1.5 - 1.0, -2.0]]


def test_min_new_tokens_masks_eos_until_reached_and_unpenalized_rows_are_untouched():
    logits = torch.tensor([[1.0, 9.0, 0.0], [1.0, 9.0, 0.0]])
    below, plain = SamplingParams(5, min_new_tokens=2), SamplingParams(5)
    out = apply_penalties(logits, [below, plain], [([0], [2]), ([0], [2])], eos_ids=frozenset({1}))
    assert out[0].tolist() == [1.0, -math.inf, 0.0] and out[1].tolist() == [1.0, 9.0, 0.0]
    reached = apply_penalties(logits, [below], [([0], [2, 2])], eos_ids=frozenset({1}))
    assert reached is logits  # nothing to do: the very tensor comes back


def test_token_logprobs_are_log_softmax_with_the_top_alternatives():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    want = torch.log_softmax(logits, -1)[0]
    [(chosen, top)] = token_logprobs(logits, [1], [2])
    assert chosen == pytest.approx(float(want[1]))
    assert [t for t, _ in top] == [2, 1] and top[0][1] == pytest.approx(float(want[2]))
    assert token_logprobs(logits, [1], [None]) == [None]


def test_min_new_tokens_ignores_eos_and_stop_sequences_before_it(pico_dir):
    tok = AutoTokenizer.from_pretrained(pico_dir)
    ids = tok("a b a b", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    early = IncrementalText(tok, [], ["b"], eos_token_ids={eos}, min_new_tokens=3)
    reasons = [early.accept(t)[1] for t in [ids[0], eos]]
    assert reasons == [None, None]  # EOS as the 2nd token of at least 3 does not end it
    plain = IncrementalText(tok, [], [], eos_token_ids={eos})
    assert [plain.accept(t)[1] for t in [ids[0], eos]] == [None, FinishReason.EOS]


# ---- through the server (gRPC), against slow references ----------------------------------------------------------
@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.TextGenerationStub(channel)


@pytest.fixture(scope="module")
def reference(pico_dir):
    return AutoModelForCausalLM.from_pretrained(pico_dir).eval(), AutoTokenizer.from_pretrained(pico_dir)


def slow_steps(reference, prompt_ids, steps, adjust=None):
    """Greedy decoding with a full forward pass per step; yields (logits of the step, chosen token)."""
    model, _ = reference
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            adjusted = adjust(logits, ids[len(prompt_ids):], ids) if adjust else logits
            token = int(torch.argmax(adjusted))
            out.append((logits, token))
            ids.append(token)
    return out


def test_logprobs_equal_log_softmax_of_a_plain_forward_pass(stub, reference):
    reply = stub.Generate(pb.GenerateRequest(model="pico", prompt=PROMPT, max_new_tokens=8, logprobs=3,
                                             cache_policy=pb.CACHE_POLICY_BYPASS), timeout=60)
    prompt_ids = reference[1](PROMPT)["input_ids"]
    steps = slow_steps(reference, prompt_ids, 8)
    assert list(reply.token_ids) == [t for _, t in steps]
    assert len(reply.logprobs) == 8
    for got, (logits, token) in zip(reply.logprobs, steps, strict=True):
        want = torch.log_softmax(logits, -1)
        assert got.token_id == token and got.logprob == pytest.approx(float(want[token]), abs=1e-4)
        assert [t.token_id for t in got.top] == torch.topk(want, 3).indices.tolist()
        assert got.token == reference[1].decode([token], skip_special_tokens=False)


def test_streamed_logprobs_are_the_unary_ones(stub):
    request = pb.GenerateRequest(model="pico", prompt=PROMPT, max_new_tokens=6, logprobs=1)
    whole = stub.Generate(request, timeout=60)
    streamed = [lp for chunk in stub.GenerateStream(request, timeout=60) for lp in chunk.logprobs]
    assert [lp.token_id for lp in streamed] == list(whole.token_ids)
    assert [lp.logprob for lp in streamed] == pytest.approx([lp.logprob for lp in whole.logprobs], abs=1e-5)


def penalized(presence, frequency, repetition):
    """The penalty rule written out token by token (the slow reference of apply_penalties)."""
    def adjust(logits, output, seen):
        out = logits.clone()
        for token in range(out.shape[0]):
            if token in seen:
                out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
            count = output.count(token)
            out[token] -= frequency * count + presence * (count > 0)
        return out
    return adjust


def test_penalized_greedy_decoding_equals_the_slow_rule(stub, reference):
    prompt = "x"  # the pico model's plain greedy output for it repeats one token: the penalties must change it
    request = pb.GenerateRequest(model="pico", prompt=prompt, max_new_tokens=12, presence_penalty=1.5,
                                 frequency_penalty=0.5, repetition_penalty=1.3)
    reply = stub.Generate(request, timeout=60)
    prompt_ids = reference[1](prompt)["input_ids"]
    want = [t for _, t in slow_steps(reference, prompt_ids, 12, penalized(1.5, 0.5, 1.3))]
    plain = [t for _, t in slow_steps(reference, prompt_ids, 12)]
    assert list(reply.token_ids) == want and want != plain
    again = stub.Generate(pb.GenerateRequest(model="pico", prompt=prompt, max_new_tokens=12), timeout=60)
    assert list(again.token_ids) == plain  # without them, plain greedy decoding
    for name, value in (("presence_penalty", 1.5), ("frequency_penalty", 0.5), ("repetition_penalty", 1.3)):
        alone = stub.Generate(pb.GenerateRequest(model="pico", prompt=prompt, max_new_tokens=12, **{name: value}),
                              timeout=60)
        rule = penalized(*[value if n == name else d for n, d in (("presence_penalty", 0.0),
                                                                  ("frequency_penalty", 0.0),
                                                                  ("repetition_penalty", 1.0))])
        assert list(alone.token_ids) == [t for _, t in slow_steps(reference, prompt_ids, 12, rule)], name


def test_token_id_prompts_equal_text_prompts_and_bad_ids_are_refused(stub, reference):
    ids = reference[1](PROMPT)["input_ids"]
    by_text = stub.Generate(pb.GenerateRequest(model="pico", prompt=PROMPT, max_new_tokens=8), timeout=60)
    by_ids = stub.Generate(pb.GenerateRequest(model="pico", prompt_token_ids=ids, max_new_tokens=8), timeout=60)
    assert by_ids.text == by_text.text and by_ids.usage.prompt_tokens == len(ids)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="pico", prompt_token_ids=[10**6]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="pico", prompt="x", prompt_token_ids=ids), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_n_samples_are_the_single_requests_with_seed_plus_i(stub):
    def single(seed):
        return stub.Generate(pb.GenerateRequest(model="pico", prompt=PROMPT, max_new_tokens=10, temperature=1.0,
                                                seed=seed), timeout=60).text
    reply = stub.Generate(pb.GenerateRequest(model="pico", prompt=PROMPT, max_new_tokens=10, temperature=1.0,
                                             seed=40, n=3), timeout=60)
    assert [s.index for s in reply.samples] == [0, 1, 2]
    assert [s.text for s in reply.samples] == [single(40), single(41), single(42)]
    assert reply.text == reply.samples[0].text
    chunks = list(stub.GenerateStream(pb.GenerateRequest(model="pico", prompt=PROMPT, max_new_tokens=10,
                                                         temperature=1.0, seed=40, n=3), timeout=60))
    for sample in reply.samples:
        mine = [c for c in chunks if c.index == sample.index]
        assert "".join(c.text for c in mine) == sample.text and mine[-1].finish_reason == pb.FINISH_REASON_LENGTH
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="pico", prompt=PROMPT, n=9), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n:" in err.value.details()


def test_min_new_tokens_and_ignore_eos_carry_generation_past_eos(stub, reference):
    """[BOS, 100]: the pico model's greedy output for it ends with EOS as its 4th token."""
    tok = reference[1]
    request = pb.GenerateRequest(model="pico", prompt_token_ids=[tok.bos_token_id, 100], max_new_tokens=30)
    first = stub.Generate(request, timeout=60)
    assert (first.finish_reason, first.usage.completion_tokens) == (pb.FINISH_REASON_EOS, 4)
    request.ignore_eos = True
    past = stub.Generate(request, timeout=60)
    assert past.finish_reason == pb.FINISH_REASON_LENGTH and past.usage.completion_tokens == 30
    assert list(past.token_ids[:4]) == list(first.token_ids)  # the EOS is there, as an ordinary token
    request.ignore_eos, request.min_new_tokens = False, 8
    held = stub.Generate(request, timeout=60)
    assert held.usage.completion_tokens >= 8 and tok.eos_token_id not in held.token_ids[:7]


def test_chat_messages_render_with_the_template_or_are_refused(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="pico", messages=[pb.ChatMessage(role="user", content="hi")]),
                      timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat template" in err.value.details()


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("presence_penalty", 3.0, "presence_penalty"), ("repetition_penalty", 0.0, "repetition_penalty"),
    ("min_new_tokens", 500, "min_new_tokens"), ("logprobs", 21, "logprobs")])
def test_out_of_range_values_name_the_field(stub, field, value, needle):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(model="pico", prompt=PROMPT, max_new_tokens=8, **{field: value}), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
