"""The FAM chain's CUDA-graph path (hf_fam/modeling/fam_graphs.py), checked on the CPU.

A real capture needs a GPU (benchmarks/cuda_checks.py compares graphs on/off there). Here a stand-in
graph class "replays" the captured step function through the same static input buffers, so the wiring
in the chain — which steps replay, how the FAM, keys and values flow in and out, padding, streaming —
is checked against the eager chain on every run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, padding_mask, random_ids, tiny_model
from test_families import build as build_family

import hf_fam
from hf_fam.modeling import fam_graphs, fam_plan


class ReplayedEagerly(fam_graphs.ChainGraph):
    replays = 0

    captures = 0

    def _capture(self, step_fn):
        type(self).captures += 1
        self._step_fn = step_fn
        return step_fn(*self.inputs)

    def _replay(self):
        type(self).replays += 1
        # like a graph replay: recompute the outputs from the static inputs (values, not new inputs)
        self.outputs = tuple(self._step_fn(*self.inputs))


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    # as on CUDA: asked for and without autograd
    monkeypatch.setattr(fam_plan, "graphs_usable", lambda device, requested: requested and not torch.is_grad_enabled())
    monkeypatch.setattr(fam_graphs, "ChainGraph", ReplayedEagerly)
    ReplayedEagerly.replays = ReplayedEagerly.captures = 0
    return ReplayedEagerly


def fam_model(family="llama", C=4, M=1, F=3):
    base = build_family("gemma2") if family == "gemma2" else tiny_model(family)  # gemma2: soft-capping, local layers
    return hf_fam.FAMForCausalLM.from_base_model(base, block_size=C, memory_segments=M, fam_length=F).eval()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_replayed_chain_equals_eager_chain(graphs_on_cpu, family):
    C = 4
    model = fam_model(family, C=C)
    ids = random_ids(2, 12 * C + 3, seed=5)  # 12 complete blocks and a partial one
    mask = padding_mask([12 * C + 3, 9 * C + 1], 12 * C + 3, side="left")
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, fam_cuda_graphs=False)
        assert graphs_on_cpu.replays == 0
        replayed = model(ids, attention_mask=mask)
        layers = model.config.num_hidden_layers
        # the shorter row completes 9 blocks: steps 0..7 replay as one group (a capture computes nothing);
        # step 8, seen for the first time, and the partial steps run eagerly
        assert graphs_on_cpu.replays == layers
        again = model(ids, attention_mask=mask)
        # the group again; step 8 and the probe of the cache's next FAM come again: captured and replayed alone;
        # so is the initial FAM's propagation (one graph through the layers)
        assert graphs_on_cpu.replays == layers * (1 + 3) + 1
    for out in (replayed, again):
        assert_close(out.logits, eager.logits, atol=0.0, mask=mask.bool())
        for got, want in zip(out.fam_state, eager.fam_state):
            assert_close(got, want, atol=0.0)


def test_replayed_streaming_equals_eager(graphs_on_cpu):
    C = 4
    model = fam_model(C=C)
    ids = random_ids(1, 40 * C, seed=9)
    with torch.no_grad():
        whole = model(ids, use_cache=False, fam_cuda_graphs=False).logits
        cache, outs = None, []
        for s in range(0, ids.shape[1], 10 * C + 3):  # chunks of 10+ blocks continue the stream
            out = model(ids[:, s : s + 10 * C + 3], cache=cache, use_cache=True)
            cache, outs = out.cache, outs + [out.logits]
    assert graphs_on_cpu.replays > 0
    assert_close(torch.cat(outs, dim=1), whole, atol=1e-5)


def test_short_chunks_and_training_do_not_capture(graphs_on_cpu):
    model = fam_model(C=4)
    with torch.no_grad():
        model(random_ids(1, 4 * (fam_graphs.MIN_GRAPH_STEPS - 1)))
    assert graphs_on_cpu.replays == 0
    model.train()
    ids = random_ids(1, 4 * 12)
    model(ids, labels=ids).loss.backward()  # autograd: graphs_usable is asked with grad enabled


def test_graphs_usable_only_on_cuda_without_autograd():
    cpu = torch.device("cpu")
    with torch.no_grad():
        assert not fam_graphs.graphs_usable(cpu, True)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert not fam_graphs.graphs_usable(cuda, True)  # autograd on
        with torch.no_grad():
            assert fam_graphs.graphs_usable(cuda, True)
            assert not fam_graphs.graphs_usable(cuda, False)


def test_failed_capture_falls_back_once_with_a_warning():
    owner = torch.nn.Linear(1, 1)
    x = torch.zeros(1, 2, 3)

    def step(fam, k, v):
        return fam, k, v

    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        assert fam_graphs.capture_chain_step(owner, step, [x, x, x]) is None  # CPU tensors: no CUDA stream
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fam_graphs.capture_chain_step(owner, step, [x, x, x]) is None  # remembered: no second try


def test_generate_and_patched_models_take_the_switch(graphs_on_cpu):
    """`fam_cuda_graphs` is a forward argument: generate() passes it on, for FAM and patched models alike."""
    model = fam_model(C=4)
    patched = hf_fam.patch(tiny_model("llama"), block_size=4, memory_segments=1, fam_length=3).eval()
    ids = random_ids(1, 4 * 10)
    for m in (model, patched):
        with_graphs = m.generate(ids, max_new_tokens=5, do_sample=False)
        replays = graphs_on_cpu.replays
        assert replays > 0
        eager = m.generate(ids, max_new_tokens=5, do_sample=False, fam_cuda_graphs=False)
        assert graphs_on_cpu.replays == replays
        assert torch.equal(with_graphs, eager)


def test_graphs_are_kept_across_forwards(graphs_on_cpu):
    """Forwards of the same shapes replay the graphs earlier ones captured: the group of `GROUP_STEPS` update
    steps on its first long chunk; the remaining update steps (2 of 10: too few to capture at once) and the initial
    FAM's propagation (one per fresh sequence; this model has too few layers to capture it at once) the second time
    they come; then no capture at all. (The chunk ends on a block boundary: the cache's next FAM keys are left to
    the next chunk, no probe.)"""
    C = 4
    model = fam_model(C=C)
    layers = model.config.num_hidden_layers
    ids = random_ids(2, 10 * C, seed=3)
    per_forward = layers * (1 + 2) + 1  # group and 2 single updates per layer; the initial FAM
    with torch.no_grad():
        eager = model(ids, fam_cuda_graphs=False).logits
        first = model(ids).logits
        assert (graphs_on_cpu.captures, graphs_on_cpu.replays) == (layers, layers)
        second = model(ids).logits
        assert (graphs_on_cpu.captures, graphs_on_cpu.replays) == (2 * layers + 1, layers + per_forward)
        third = model(ids).logits
    assert (graphs_on_cpu.captures, graphs_on_cpu.replays) == (2 * layers + 1, layers + 2 * per_forward)
    assert fam_graphs.cached_graph_count(model) == 2 * layers + 1
    for out in (first, second, third):
        assert_close(out, eager, atol=0.0)
    fam_graphs.clear_graphs(model)
    assert fam_graphs.cached_graph_count(model) == 0


def test_kept_graphs_take_this_forwards_positions(graphs_on_cpu):
    """The FAM positions (and their rotary embedding) are graph inputs: a forward at another position offset
    replays the kept graph with its own positions, not the capturing forward's."""
    C = 4
    model = fam_model(C=C)
    ids = random_ids(1, 10 * C, seed=4)
    with torch.no_grad():
        for _ in range(2):  # the second captures the initial FAM's propagation
            model(ids, fam_position_offset=torch.tensor([0]), use_cache=False)
        captures = graphs_on_cpu.captures
        moved = model(ids, fam_position_offset=torch.tensor([37]), use_cache=False).logits
        assert graphs_on_cpu.captures == captures  # kept
        eager = model(ids, fam_position_offset=torch.tensor([37]), fam_cuda_graphs=False).logits
        unmoved = model(ids, fam_position_offset=torch.tensor([0]), fam_cuda_graphs=False).logits
    assert not torch.allclose(eager, unmoved)  # the offset matters, so the check below is not vacuous
    assert_close(moved, eager, atol=0.0)


def test_short_chunks_capture_when_the_step_comes_again(graphs_on_cpu):
    """Streaming in short chunks, as generate() crosses block boundaries (a block's first token, then the rest of
    the block): a step is captured the second time it comes, the update and the probe (at the first token inside
    each block, for the FAM's keys the chunk before left pending) alike, and the stream equals the parallel eager
    forward."""
    C = 4
    model = fam_model(C=C)
    layers = model.config.num_hidden_layers
    ids = random_ids(1, 6 * C, seed=8)
    with torch.no_grad():
        whole = model(ids, use_cache=False, fam_cuda_graphs=False).logits
        cache, outs = None, []
        for s in range(0, ids.shape[1], C):
            for part in (ids[:, s : s + 1], ids[:, s + 1 : s + C]):
                out = model(part, cache=cache, use_cache=True)
                cache, outs = out.cache, outs + [out.logits]
    # update and probe of every layer, once each; the initial FAM's propagation came once (one sequence): eager
    assert graphs_on_cpu.captures == 2 * layers
    assert graphs_on_cpu.replays > 4 * layers
    assert_close(torch.cat(outs, dim=1), whole, atol=1e-5)


def test_fingerprint_sees_what_a_graph_cannot():
    """`module_fingerprint` changes where a recorded graph would go stale (a weight replaced by another tensor,
    a hook added, a flag that steers control flow, the mode) and not where it stays right (an in-place write)."""
    layer = tiny_model("llama").model.layers[0]
    base = fam_graphs.module_fingerprint(layer)
    assert fam_graphs.module_fingerprint(layer) == base
    with torch.no_grad():
        layer.mlp.up_proj.weight.mul_(2.0)  # same memory: a graph reads the new values
    assert fam_graphs.module_fingerprint(layer) == base
    layer.mlp.up_proj.weight = torch.nn.Parameter(layer.mlp.up_proj.weight.detach().clone())
    replaced = fam_graphs.module_fingerprint(layer)
    assert replaced != base
    handle = layer.self_attn.register_forward_hook(lambda *a: None)
    assert fam_graphs.module_fingerprint(layer) != replaced
    handle.remove()
    assert fam_graphs.module_fingerprint(layer) == replaced
    layer.self_attn.some_flag = True
    flagged = fam_graphs.module_fingerprint(layer)
    layer.self_attn.some_flag = False
    assert fam_graphs.module_fingerprint(layer) not in (replaced, flagged)
    layer.train()
    assert fam_graphs.module_fingerprint(layer) != fam_graphs.module_fingerprint(layer.eval())


def test_lora_changes_between_forwards_recapture(graphs_on_cpu):
    """PEFT keeps enabled/disabled, merged and the active adapter as plain attributes of its layers, read by
    Python control flow: each change is a new fingerprint, so the step is captured again, and every forward
    equals the eager chain (benchmarks/cuda_checks.py compares real graphs the same way on a GPU)."""
    peft = pytest.importorskip("peft")
    C = 4
    model = peft.get_peft_model(
        fam_model(C=C), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    layers = model.config.num_hidden_layers
    ids = random_ids(1, 9 * C, seed=6)

    def both():  # no cache: only the update steps are captured
        return model(ids, use_cache=False).logits, model(ids, use_cache=False, fam_cuda_graphs=False).logits

    with torch.no_grad():
        outs = [both(), both()]
        # the group of 8 update steps, then the 9th step and the initial FAM's propagation the second time they come
        assert graphs_on_cpu.captures == 2 * layers + 1
        outs.append(both())
        assert graphs_on_cpu.captures == 2 * layers + 1  # all replayed
        with model.disable_adapter():
            outs.append(both())
        assert graphs_on_cpu.captures == 2 * (2 * layers + 1)
        model.merge_adapter()
        outs.append(both())
        assert graphs_on_cpu.captures == 3 * (2 * layers + 1)
        model.unmerge_adapter()
        outs.append(both())
        assert graphs_on_cpu.captures == 4 * (2 * layers + 1)
    for graphed, eager in outs:
        assert_close(graphed, eager, atol=0.0)


def test_layers_with_weights_elsewhere_run_eagerly(graphs_on_cpu):
    """A layer whose weights are not all on the forward's device (offloaded, loaded by a hook for each call) is
    never captured: a kept graph would read memory the hook frees."""
    model = fam_model(C=4)
    model.model.layers[0].mlp.register_buffer("elsewhere", torch.zeros(1, device="meta"), persistent=False)
    ids = random_ids(1, 10 * 4, seed=2)
    with torch.no_grad():
        for _ in range(2):
            model(ids, use_cache=False)
    # layer 1's update steps only (the group of 8, then the 2 single steps the second time): layer 0 runs eagerly, and
    # so does the initial FAM's propagation (through layer 0)
    assert graphs_on_cpu.captures == 2


def test_kept_graphs_are_bounded_by_input_signatures(graphs_on_cpu, monkeypatch):
    """A model keeps the graphs of its `MAX_CACHED_SHAPES` most recent input signatures; older ones are dropped
    and captured again when they come back, with the same results."""
    # a forward of 10 blocks without cache uses three: the update group, the single update steps, the initial FAM's
    monkeypatch.setattr(fam_graphs, "MAX_CACHED_SHAPES", 3)
    model = fam_model(C=4)
    with torch.no_grad():
        for batch in (1, 2, 3, 1):
            ids = random_ids(batch, 10 * 4, seed=batch)
            got = model(ids, use_cache=False).logits
            assert len(fam_graphs._CACHES[model.model.layers]) <= 3
            assert_close(got, model(ids, use_cache=False, fam_cuda_graphs=False).logits, atol=0.0)
    # batch 1's update groups were dropped (by batch 2's and 3's signatures) and captured again (the single steps,
    # dropped too, are seen once per batch size: never captured); the initial FAM's propagation runs on one row at
    # every batch size: one signature, captured the second time it came
    assert graphs_on_cpu.captures == 4 * model.config.num_hidden_layers + 1


def test_update_groups_replay_then_single_steps(graphs_on_cpu):
    """A chunk of 19 complete blocks replays its first 16 updates as 2 groups of `GROUP_STEPS` and the last 3 one
    at a time (captured the second time they come); the stream it leaves in the cache continues as the eager
    chain's does."""
    C = 4
    model = fam_model(C=C)
    layers = model.config.num_hidden_layers
    ids = random_ids(1, 19 * C + 2, seed=12)
    more = random_ids(1, 2 * C, seed=13)
    with torch.no_grad():
        eager = model(ids, fam_cuda_graphs=False)
        eager_next = model(more, cache=eager.cache, fam_cuda_graphs=False).logits
        first = model(ids)
        assert graphs_on_cpu.replays == layers * 2  # two group replays per layer, nothing else yet
        second = model(ids)
        next_logits = model(more, cache=second.cache).logits
    for out in (first, second):
        assert_close(out.logits, eager.logits, atol=0.0)
        for got, want in zip(out.fam_state, eager.fam_state):
            assert_close(got, want, atol=0.0)
    assert_close(next_logits, eager_next, atol=0.0)
    names = [name[2] for name, _ in fam_graphs.kept_graphs(model) if len(name) == 4]
    assert sorted(set(names)) == ["probe", "update", "update_group"]


def test_graphs_of_one_shape_share_their_input_buffers(graphs_on_cpu):
    """Every layer's graph of one input signature copies its inputs into the same static buffers (replays run
    one after another), so the group's block keys/values are held once per model, not once per layer."""
    C = 4
    model = fam_model(C=C)
    with torch.no_grad():
        model(random_ids(2, 8 * C, seed=14), use_cache=False)
        model(random_ids(2, 8 * C, seed=15), use_cache=False)
        eager = model(random_ids(2, 8 * C, seed=15), use_cache=False, fam_cuda_graphs=False).logits
        replayed = model(random_ids(2, 8 * C, seed=15), use_cache=False).logits
    groups = [graph for name, graph in fam_graphs.kept_graphs(model) if name[2] == "update_group"]
    assert len(groups) == model.config.num_hidden_layers == 2
    assert [b.data_ptr() for b in groups[0].inputs] == [b.data_ptr() for b in groups[1].inputs]
    assert groups[0].inputs[1].shape[2] == fam_graphs.GROUP_STEPS * C  # the group's block keys
    assert_close(replayed, eager, atol=0.0)


@pytest.mark.parametrize("size", [1, 3])
def test_group_size_is_read_at_each_forward(graphs_on_cpu, monkeypatch, size):
    """`GROUP_STEPS` set at run time takes effect at the next forward: 1 replays every update alone (10 steps, all
    captured at once), 3 replays 10 updates as 3 groups and one single step (seen once: eager); both equal the
    eager chain."""
    C = 4
    model = fam_model(C=C)
    layers = model.config.num_hidden_layers
    ids = random_ids(1, 10 * C, seed=16)
    monkeypatch.setattr(fam_graphs, "GROUP_STEPS", size)
    with torch.no_grad():
        eager = model(ids, use_cache=False, fam_cuda_graphs=False).logits
        replayed = model(ids, use_cache=False).logits
    assert graphs_on_cpu.replays == layers * (10 if size == 1 else 3)
    kinds = {name[2] for name, _ in fam_graphs.kept_graphs(model)}
    assert kinds == ({"update"} if size == 1 else {"update_group"})
    assert_close(replayed, eager, atol=0.0)
