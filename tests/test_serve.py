"""``python -m engine serve`` driven by the real ``tinker`` SDK (0.38): one server process per
module over a tiny random Qwen3 checkpoint with a byte tokenizer (vocabulary 259, so every
sampled id is a byte), on a free loopback port, with an API key."""
from __future__ import annotations

import math
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

# The cookbook loops (shared with test_tinker_inprocess) use a client future as the client and
# the *_async save calls, as the cookbook does; SDK 0.38 deprecates both with FutureWarnings.
pytestmark = [pytest.mark.filterwarnings("ignore:Using the future as the:FutureWarning"),
              pytest.mark.filterwarnings("ignore:DEPRECATED.*_async\\(\\) is deprecated:FutureWarning")]

tinker = pytest.importorskip("tinker")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from safetensors.torch import load_file  # noqa: E402
from tinker import types  # noqa: E402
from tinker.types.tensor_data import TensorData  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from engine.models.presets import save_random_checkpoint  # noqa: E402
from engine.serve.process import launch  # noqa: E402
from test_tinker_inprocess import check_rl_loop, check_sl_loop  # noqa: E402

NAME = "tiny/Qwen3-test"
KEY = "tml-test-key"


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, model: Path, checkpoints: Path, log: Path):
        self.proc, self.url, self.model, self.checkpoints, self.log = proc, url, model, checkpoints, log

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={"X-API-Key": KEY, **kwargs.pop("headers", {})}, timeout=60,
                          **kwargs)

    def result(self, request_id: str) -> httpx.Response:
        while True:
            r = self.post("/api/v1/retrieve_future", json={"request_id": request_id})
            if r.headers.get("content-type", "").startswith("application/json") and r.json().get("type") == "try_again":
                continue
            return r

    def folder(self, uri: str) -> Path:
        return self.checkpoints / uri.removeprefix("tinker://")


def start_server(root: Path) -> Server:
    model = save_random_checkpoint(root / "tiny", "qwen3", tokenizer=True, vocab_size=259, seed=1)
    log = root / "server.log"
    with open(log, "w") as err:
        try:
            proc, url = launch({NAME: model}, checkpoint_dir=root / "checkpoints", api_key=KEY,
                               args=("--max-batch-size", "2048"), stderr=err, timeout=120)
        except RuntimeError as e:
            pytest.fail(f"{e}; stderr:\n{log.read_text()}")
    return Server(proc, url, model, root / "checkpoints", log)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = start_server(tmp_path_factory.mktemp("serve"))
    yield started
    stop(started)


@pytest.fixture(scope="module")
def service(server):
    client = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    yield client
    client.close("success").result()  # before the server stops: its heartbeats end with the session


def text_datum(text: str) -> types.Datum:
    ids = list(text.encode())
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor(ids[1:])),
                                       "weights": TensorData.from_torch(torch.ones(len(ids) - 1))})


DATA = [text_datum(t) for t in ("hello world", "the quick brown fox", "0123456789", "abcabcabc")]
ADAM = types.AdamParams(learning_rate=1e-2)


def test_api_key_is_required(server):
    assert httpx.get(server.url + "/api/v1/healthz").status_code == 401
    assert httpx.get(server.url + "/api/v1/healthz", headers={"X-API-Key": "tml-wrong"}).status_code == 401
    assert httpx.get(server.url + "/api/v1/healthz", headers={"X-API-Key": KEY}).json() == {"status": "ok"}


def test_supervised_steps_lower_the_loss_and_chunks_run_in_seq_id_order(service):
    tc = service.create_lora_training_client(base_model=NAME, rank=8).result()
    info = tc.get_info()
    assert (info.model_data.model_name, info.model_data.arch, info.is_lora, info.lora_rank) == (NAME, "qwen3", True, 8)
    assert tc.get_tokenizer().encode("hi", add_special_tokens=False) == list(b"hi")
    losses = []
    for _ in range(4):
        fb = tc.forward_backward(DATA, "cross_entropy")  # both posted before either is awaited
        step = tc.optim_step(ADAM)
        losses.append(fb.result().metrics["loss:sum"])
        assert step.result().metrics["grad_norm"] > 0
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    custom = tc.forward_backward_custom(DATA, lambda data, logprobs: (-sum(lp.sum() for lp in logprobs), {})).result()
    plain = tc.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
    assert custom.metrics["loss:sum"] == pytest.approx(plain, rel=1e-5)  # the SDK runs it client-side
    tc.optim_step(types.AdamParams(learning_rate=0.0)).result()  # drop its gradient
    whole = tc.forward(DATA, "cross_entropy").result()
    holder = tc.holder  # one datum per chunk: the SDK posts chunks 1..3 before chunk 0
    config = holder._client_config
    holder._client_config = config.model_copy(update={"fwdbwd_max_chunk_len": 1})
    try:
        chunked = tc.forward(DATA, "cross_entropy").result()
    finally:
        holder._client_config = config
    assert chunked.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(chunked.loss_fn_outputs, whole.loss_fn_outputs):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), rtol=1e-6)


def test_seq_ids_posted_out_of_order_run_in_order(server, service):
    tc = service.create_lora_training_client(base_model=NAME, rank=4).result()
    model_id = tc.get_info().model_id
    step = server.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 2,
                                                   "adam_params": {"learning_rate": 1e-2}}).json()["request_id"]
    from tinker.proto.request_conv import forward_backward_request_to_proto

    request = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=DATA, loss_fn="cross_entropy"), model_id=model_id, seq_id=1)
    fb = server.post("/api/v1/forward_backward", content=forward_backward_request_to_proto(request).SerializeToString(),
                     headers={"Content-Type": "application/x-protobuf"}).json()["request_id"]
    assert server.result(fb).headers["content-type"] == "application/x-protobuf"
    assert server.result(step).json()["metrics"]["grad_norm"] > 0  # the gradient of seq_id 1 was there
    again = server.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 2,  # a retried post
                                                    "adam_params": {"learning_rate": 1e-2}}).json()["request_id"]
    assert again == step
    stale = server.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 0,
                                                    "adam_params": {"learning_rate": 1e-2}}).json()["request_id"]
    failed = server.result(stale).json()
    assert failed["category"] == "user" and "its next seq_id is 3" in failed["error"]


def sample_datums(prompt: list[int], response: types.SampleResponse) -> list[types.Datum]:
    """rl_loop's datums: prompt + sampled tokens, logprobs and advantages padded over the prompt."""
    rewards = [float(len(s.tokens)) + 0.1 * i for i, s in enumerate(response.sequences)]
    mean = sum(rewards) / len(rewards)
    out = []
    for seq, reward in zip(response.sequences, rewards):
        ob = len(prompt) - 1
        tokens = prompt + seq.tokens[:-1]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs={
            "target_tokens": TensorData.from_torch(torch.tensor([0] * ob + seq.tokens)),
            "logprobs": TensorData.from_torch(torch.tensor([0.0] * ob + seq.logprobs)),
            "advantages": TensorData.from_torch(torch.full((len(tokens),), reward - mean))}))
    return out


def test_rl_losses_on_sampled_data(service):
    tc = service.create_lora_training_client(base_model=NAME, rank=8).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = list(b"Question: 2+2=")
    response = sampler.sample(types.ModelInput.from_ints(prompt), 4, types.SamplingParams(max_tokens=6, seed=7)).result()
    assert len(response.sequences) == 4 and len({s.sequence_id for s in response.sequences}) == 4
    datums = sample_datums(prompt, response)
    for loss in ("importance_sampling", "ppo", "cispo", "dro"):
        out = tc.forward_backward(datums, loss).result()
        if loss == "ppo":  # per-datum thresholds: per token in one datum, one number in another
            n = datums[0].model_input.length
            datums[0].loss_fn_inputs.update(clip_low_threshold=TensorData.from_torch(torch.full((n,), 0.9)),
                                            clip_high_threshold=TensorData.from_torch(torch.full((n,), 1.1)))
            datums[1].loss_fn_inputs.update(clip_low_threshold=TensorData.from_torch(torch.tensor(0.5)),
                                            clip_high_threshold=TensorData.from_torch(torch.tensor(2.0)))
            clipped = tc.forward(datums, "ppo").result()
            assert clipped.metrics["loss:sum"] == pytest.approx(tc.forward(datums[:1], "ppo").result().metrics[
                "loss:sum"] + tc.forward(datums[1:], "ppo").result().metrics["loss:sum"], rel=1e-5)
            for d in datums[:2]:
                del d.loss_fn_inputs["clip_low_threshold"], d.loss_fn_inputs["clip_high_threshold"]
        assert math.isfinite(out.metrics["loss:sum"]), loss
        for datum, seq, lp in zip(datums, response.sequences, out.loss_fn_outputs):
            # the sampler is a snapshot of these weights: the trainer sees the same logprobs
            np.testing.assert_allclose(lp["logprobs"].to_numpy()[-len(seq.tokens):], seq.logprobs, atol=1e-4)
    assert tc.optim_step(ADAM).result().metrics["grad_norm"] > 0


def adapter(server: Server, uri: str) -> dict[str, torch.Tensor]:
    return load_file(server.folder(uri) / "adapter_model.safetensors")


def test_save_state_then_resume_with_optimizer_is_bit_exact(server, service):
    tc = service.create_lora_training_client(base_model=NAME, rank=8).result()
    for _ in range(2):
        tc.forward_backward(DATA, "cross_entropy")
        tc.optim_step(ADAM)
    state = tc.save_state("mid", ttl_seconds=3600).result().path
    assert state.startswith("tinker://") and "/weights/mid" in state
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    outs = []
    for client in (tc, resumed):
        loss = client.forward_backward(DATA, "cross_entropy").result().metrics["loss:sum"]
        client.optim_step(ADAM).result()
        outs.append((loss, adapter(server, client.save_weights_for_sampler("after").result().path)))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1].keys() == outs[1][1].keys()
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])
    fresh = service.create_training_client_from_state(state).result()  # weights only: Adam starts again
    assert fresh.get_info().lora_rank == 8
    assert fresh.forward(DATA, "cross_entropy").result().metrics["loss:sum"] == outs[0][0]


def test_sampling_logprobs_stops_and_seeds(service):
    sampler = service.create_sampling_client(base_model=NAME).result()
    prompt = types.ModelInput.from_ints(list(b"Once upon a time"))
    params = types.SamplingParams(max_tokens=24, seed=11, stop=[])
    first = sampler.sample(prompt, 1, params).result().sequences[0]
    again = sampler.sample(prompt, 1, params).result().sequences[0]
    other = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=24, seed=12, stop=[])).result().sequences[0]
    assert first.tokens == again.tokens and first.tokens != other.tokens
    assert len(first.tokens) == len(first.logprobs) == 24 and first.stop_reason == "length"
    # compute_logprobs of prompt + sample equals the sampler's logprobs (temperature 1)
    scored = sampler.compute_logprobs(types.ModelInput.from_ints(prompt.to_ints() + first.tokens)).result()
    assert scored[0] is None
    np.testing.assert_allclose(scored[-24:], first.logprobs, atol=1e-4)
    # a stop token id ends the sequence at its first occurrence, kept in the output
    stop_id = first.tokens[5]
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=24, seed=11, stop=[stop_id])).result()
    seq = stopped.sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens == first.tokens[:first.tokens.index(stop_id) + 1]
    # a stop string: the first printable ASCII byte sampled
    k = next(i for i, t in enumerate(first.tokens) if 33 <= t < 127 and i > 0)
    text = chr(first.tokens[k])
    seq = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=24, seed=11, stop=[text])).result().sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens == first.tokens[:first.tokens.index(first.tokens[k]) + 1]


def test_trainers_and_samplers_live_side_by_side(service):
    a = service.create_lora_training_client(base_model=NAME, rank=4).result()
    b = service.create_lora_training_client(base_model=NAME, rank=4).result()
    base = service.create_sampling_client(base_model=NAME).result()
    prompt = types.ModelInput.from_ints(list(b"hello world, hello"))
    before_b = b.forward(DATA, "cross_entropy").result().metrics["loss:sum"]
    before_base = base.compute_logprobs(prompt).result()
    snapshot = a.save_weights_and_get_sampling_client().result()
    before_snapshot = snapshot.compute_logprobs(prompt).result()
    for _ in range(2):
        a.forward_backward(DATA, "cross_entropy")
        a.optim_step(ADAM)
    later = a.save_weights_and_get_sampling_client().result()
    assert b.forward(DATA, "cross_entropy").result().metrics["loss:sum"] == before_b
    assert base.compute_logprobs(prompt).result() == before_base
    assert snapshot.compute_logprobs(prompt).result() == before_snapshot  # a snapshot: later steps unseen
    assert later.compute_logprobs(prompt).result() != before_snapshot
    named = a.save_weights_for_sampler("named").result().path
    assert named.endswith("/sampler_weights/named")
    by_path = service.create_sampling_client(model_path=named).result()
    assert by_path.get_base_model() == NAME
    assert by_path.compute_logprobs(prompt).result() == later.compute_logprobs(prompt).result()


def test_finished_session_releases_its_training_clients(server):
    other = tinker.ServiceClient(base_url=server.url, api_key=KEY)
    tc = other.create_lora_training_client(base_model=NAME, rank=4).result()
    model_id = tc.get_info().model_id
    sampler = tc.save_weights_and_get_sampling_client().result()
    response = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=2)).result()
    session = model_id.split(":")[0]
    polled = server.post("/api/v1/retrieve_futures", json={"target": {"sampling_session_id": f"{session}:sample:0"},
                                                           "prev_cursor": 0}).json()
    assert [c["state"] for c in polled["completions"]] == ["finished"] and polled["cursor"] == 1
    assert {s.sequence_id.rsplit(":", 1)[0] for s in response.sequences} == {polled["completions"][0]["request_id"]}
    snapshots = list(server.checkpoints.glob(f"{model_id.replace(':', '_')}/sampler_weights/ephemeral-*"))
    assert len(snapshots) == 1
    other.close("success").result()
    assert server.post("/api/v1/get_info", json={"model_id": model_id}).status_code == 400
    assert server.post("/api/v1/session_heartbeat", json={"session_id": session}).status_code == 410
    assert not snapshots[0].exists()


def test_bad_requests_fail_alone(server, service):
    tc = service.create_lora_training_client(base_model=NAME, rank=4).result()
    with pytest.raises(tinker.RequestFailedError, match="loss_fn must be one of"):
        tc.forward_backward(DATA, "no_such_loss").result()
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 999]),
                      loss_fn_inputs={"target_tokens": TensorData.from_torch(torch.tensor([2, 3, 4]))})
    with pytest.raises(tinker.RequestFailedError, match="token id 999, outside the vocabulary"):
        tc.forward_backward([bad], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="base_model 'nope' is not served"):
        service.create_lora_training_client(base_model="nope", rank=4).result()
    for path in ("tinker://../weights/x", "tinker://run/weights/../../../etc", "/etc/passwd",
                 "tinker://nope/weights/none"):
        with pytest.raises(tinker.RequestFailedError, match="path|checkpoint dir|plain name"):
            service.create_training_client_from_state(path).result()
    outside = server.checkpoints / "escape"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "weights").mkdir(exist_ok=True)
    (outside / "weights" / "link").symlink_to("/tmp", target_is_directory=True)
    with pytest.raises(tinker.RequestFailedError, match="outside the checkpoint dir"):
        service.create_training_client_from_state("tinker://escape/weights/link").result()
    with pytest.raises(tinker.BadRequestError, match="sampler_weights"):
        service.create_sampling_client(model_path="tinker://escape/weights/link").result()
    garbage = server.post("/api/v1/forward_backward", content=b"\xff\x00 not a protobuf",
                          headers={"Content-Type": "application/x-protobuf"}).json()["request_id"]
    failed = server.result(garbage).json()
    assert failed["category"] == "user" and "ForwardBackwardRequest protobuf" in failed["error"]
    # a client that drops its connection mid-poll takes nothing with it
    parked = server.post("/api/v1/optim_step", json={"model_id": tc.get_info().model_id, "seq_id": 1000,
                                                     "adam_params": {"learning_rate": 1e-2}}).json()["request_id"]
    slow = tc.forward_backward(DATA, "cross_entropy")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/api/v1/retrieve_future", json={"request_id": parked}, timeout=0.5,
                   headers={"X-API-Key": KEY})
    assert math.isfinite(slow.result().metrics["loss:sum"])
    assert math.isfinite(tc.optim_step(ADAM).result().metrics["grad_norm"])
    assert server.post("/api/v1/retrieve_future", json={"request_id": "req-999999"}).status_code == 410
    assert "not supported" in server.post("/api/v1/copy_weights", json={}).json()["detail"]


@pytest.fixture
def new_service_client(server):
    """The cookbook's ``tinker.ServiceClient(base_url=config.base_url, user_metadata=...)``
    (test_tinker_inprocess's twin constructs ``engine.ServiceClient(models=...)``); each
    session is finished at the end, as the recipe's process would end."""
    made = []

    def new(**kwargs):
        made.append(tinker.ServiceClient(base_url=server.url, api_key=KEY, **kwargs))
        return made[-1]
    yield new
    for client in made:
        client.close("success").result()


def test_cookbook_loops(server, tmp_path, new_service_client):
    """The cookbook's sl_loop and rl_loop logic (test_tinker_inprocess's copies and checks)
    against the server: the NLL falls, a run killed after its step-2 checkpoint and resumed
    logs exactly the uninterrupted run's metrics, and RL batches are on-policy."""
    tokenizer = AutoTokenizer.from_pretrained(server.model)  # tokenizer_utils.get_tokenizer(model_name)
    final = check_sl_loop(NAME, tmp_path / "sl", tokenizer, types, new_service_client)
    assert final.state_path.startswith("tinker://") and final.sampler_path.endswith("/sampler_weights/final")
    check_rl_loop(NAME, tmp_path / "rl", tokenizer, types, new_service_client, "importance_sampling")


def test_sigterm_fails_pending_requests_and_exits(tmp_path):
    """On a server of its own, driven over plain HTTP: an SDK client would go on sending
    heartbeats to the stopped server from its background thread."""
    own = start_server(tmp_path)
    try:
        session = own.post("/api/v1/create_session", json={}).json()["session_id"]
        created = own.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0, "base_model": NAME,
                                                         "lora_config": {"rank": 4}}).json()["request_id"]
        model_id = own.result(created).json()["model_id"]
        parked = own.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 50,
                                                      "adam_params": {"learning_rate": 1e-2}}).json()["request_id"]
        answer: list[httpx.Response] = []
        poll = threading.Thread(target=lambda: answer.append(own.post("/api/v1/retrieve_future",
                                                                      json={"request_id": parked})))
        poll.start()
        poll.join(timeout=1.0)
        assert not answer  # still parked behind seq_id 1
        own.proc.send_signal(signal.SIGTERM)
        poll.join(timeout=30)
        assert answer and "shutting down (SIGTERM)" in answer[0].json()["error"]
        assert own.proc.wait(timeout=60) == 0, own.log.read_text()
        leftovers = [p for p in own.checkpoints.rglob("*") if p.name.startswith(".")]
        assert not leftovers
    finally:
        stop(own)


# -- without a server ---------------------------------------------------------------------------------
def test_wire_formats_round_trip_through_the_sdk():
    from tinker.proto.request_conv import forward_backward_request_to_proto
    from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

    from engine.infer import SampledSequence, SampleResponse
    from engine.serve import wire

    g = torch.Generator().manual_seed(0)
    sparse = torch.zeros(3, 4, dtype=torch.long)
    sparse[1, 2] = 7
    datums = [types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]), loss_fn_inputs={
        "target_tokens": TensorData.from_torch(torch.tensor([6, 7, 8])),
        "weights": TensorData.from_torch(torch.rand(3, generator=g)),
        "grid": TensorData.from_torch_sparse(sparse)})]
    request = types.ForwardBackwardRequest(forward_backward_input=types.ForwardBackwardInput(
        data=datums, loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7}), model_id="m", seq_id=3)
    call = wire.decode_forward_backward(forward_backward_request_to_proto(request).SerializeToString())
    assert (call.model_id, call.seq_id, call.loss_fn, call.loss_fn_config) == ("m", 3, "ppo", {"clip_low_threshold": 0.7})
    tokens, inputs = call.data[0]
    assert tokens == [5, 6, 7] and inputs["target_tokens"].tolist() == [6, 7, 8]
    assert torch.equal(inputs["weights"], datums[0].loss_fn_inputs["weights"].to_torch())
    assert torch.equal(inputs["grid"], sparse)
    with pytest.raises(ValueError, match="not a ForwardBackwardRequest protobuf"):
        wire.decode_forward_backward(b"\xff\xff\xff")

    outputs = [{"logprobs": torch.randn(n, generator=g)} for n in (3, 1, 5)]
    out = deserialize_forward_backward_output(wire.encode_forward_backward_output(outputs, {"loss:sum": 2.5, "n": 1}))
    assert out.metrics == {"loss:sum": 2.5, "n:mean": 1.0}
    for mine, theirs in zip(outputs, out.loss_fn_outputs):
        assert torch.equal(theirs["logprobs"].to_torch(), mine["logprobs"])
    response = SampleResponse([SampledSequence([4, 5], [-0.5, -1.25], "stop"), SampledSequence([9], [-2.0], "length")],
                              prompt_logprobs=[None, -3.0, -0.25])
    back = deserialize_sample_response(wire.encode_sample_response(response))
    assert [(s.tokens, s.logprobs, s.stop_reason) for s in back.sequences] == [
        ([4, 5], [-0.5, -1.25], "stop"), ([9], [-2.0], "length")]
    assert back.prompt_logprobs == [None, -3.0, -0.25]


def test_checkpoint_uris_resolve_strictly_inside_the_dir(tmp_path):
    from engine.serve.checkpoints import CheckpointDir

    ckpt = CheckpointDir(tmp_path / "ckpt")
    (ckpt.root / "run" / "weights" / "a").mkdir(parents=True)
    (ckpt.root / "run" / "weights" / "out").symlink_to(tmp_path, target_is_directory=True)
    assert ckpt.resolve("tinker://run/weights/a") == ("run", "weights", ckpt.root / "run" / "weights" / "a")
    bad = {"tinker://run/weights/out": "outside the checkpoint dir", "tinker://../weights/a": "plain name",
           "tinker://run/weights/../a": "must be tinker://", "tinker://run/weights/a/b": "must be tinker://",
           "tinker://run/other/a": "must be tinker://", "file:///etc": "must be a tinker://",
           "tinker://run/weights/missing": "no such checkpoint", "tinker://run/weights/": "plain name"}
    for uri, message in bad.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            ckpt.resolve(uri)
    with pytest.raises(ValueError, match="needs sampler_weights"):
        ckpt.resolve("tinker://run/weights/a", kind="sampler_weights")


def test_shared_base_trainers_share_weights_and_refuse_full_training(tmp_path):
    import engine

    path = save_random_checkpoint(tmp_path / "m", "llama")
    builder = engine.model(path).shared_base()
    one = builder.with_adapter(rank=2).spawn_train(max_batch_size=64)
    two = builder.with_adapter(rank=4).spawn_train(max_batch_size=64)
    assert one._trainer.model.embed.weight is two._trainer.model.embed.weight
    data = [engine.Datum(engine.ModelInput([1, 2, 3, 4]), {"target_tokens": [2, 3, 4, 5]})]
    before = two.forward(data, "cross_entropy").result().metrics["loss:sum"]
    one.forward_backward(data, "cross_entropy")
    one.optim_step(engine.AdamParams(learning_rate=1e-2)).result()
    assert two.forward(data, "cross_entropy").result().metrics["loss:sum"] == before
    with pytest.raises(ValueError, match="only a LoRA adapter"):
        builder.spawn_train(max_batch_size=64)
    with pytest.raises(ValueError, match="tp must be 1"):
        builder.tp(2).with_adapter(rank=2).spawn_train(max_batch_size=64)
    one.close()
    two.close()


def test_sigint_stops_a_server_cleanly(tmp_path):
    model = save_random_checkpoint(tmp_path / "m", "llama")
    proc, url = launch({"m": model}, checkpoint_dir=tmp_path / "checkpoints", timeout=120)
    assert url.startswith("http://127.0.0.1:")  # loopback unless --host says otherwise
    assert httpx.get(url + "/api/v1/healthz").json() == {"status": "ok"}  # no --api-key: open
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
