"""Several CPU processes (gloo) with expert parallelism, compared with one process.

The multi-process side runs the grouped fast path, the 1-process reference DeepSpeed's per-expert loop, so
the parity tests also show the fast path is exact under expert parallelism. Configurations: 2 processes
with ep 2 (experts split, no replicas), 4 processes with ep 2 (expert-data parallelism: two replicas of
each expert), 2 processes with ep 1 (every expert replicated); each under ZeRO 0, 1 and 2 with gradient
clipping active on every step and weight decay on."""
import pytest
import torch
import torch.multiprocessing as mp

from mmolre.distributed import free_port
from tests import dist_helpers as h


def _spawn(worker, out_path, world=2):
    mp.spawn(worker, args=(world, free_port(), str(out_path)), nprocs=world, join=True)
    return torch.load(out_path, weights_only=False)


def _one_process(reference, out_path) -> None:
    """The one-process reference in a fresh interpreter (no process group, torch's defaults), writing out_path."""
    proc = mp.get_context("spawn").Process(target=reference, args=(str(out_path),))
    proc.start()
    proc.join(300)
    assert proc.exitcode == 0


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    ranks = _spawn(h.parity_worker, tmp / "ep2.pt")
    _one_process(h.reference_single_process, tmp / "ep1.pt")
    return ranks, torch.load(tmp / "ep1.pt", weights_only=False)


def test_ep2_outputs_and_loss_match_one_process(parity):
    ranks, ref = parity
    for rank, half in zip(ranks, ref["halves"]):
        torch.testing.assert_close(rank["sentiment"], half["sentiment"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["emotion"], half["emotion"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["aux"], half["aux"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["loss"], half["loss"], rtol=1e-5, atol=1e-6)


def test_ep2_expert_gradients_match_one_process(parity):
    ranks, ref = parity
    got = {**ranks[0]["experts"], **ranks[1]["experts"]}
    assert set(got) == set(ref["experts"])   # each global expert lives on exactly one rank
    assert {k[1] for k in ranks[0]["experts"]} == {0, 1} and {k[1] for k in ranks[1]["experts"]} == {2, 3}
    # rows really crossed ranks: experts on both ranks received gradient in every layer
    for rank in ranks:
        for layer in {k[0] for k in rank["experts"]}:
            assert any(g.abs().sum() > 0 for k, g in rank["experts"].items() if k[0] == layer), layer
    for key, grad in ref["experts"].items():
        torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_ep2_dense_gradients_are_all_reduced_to_the_one_process_values(parity):
    ranks, ref = parity
    for name, grad in ref["dense"].items():
        torch.testing.assert_close(ranks[0]["dense"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(ranks[1]["dense"][name], grad, rtol=1e-4, atol=1e-6)


def test_ep2_zero2_training_runs_and_the_loss_falls(tmp_path):
    ranks = _spawn(h.training_worker, tmp_path / "train.pt")
    losses = ranks[0]["losses"]
    assert losses == ranks[1]["losses"]   # the all-reduced loss is the same number on both ranks
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, losses
    # expert-parallel 2: each rank holds half of the shared experts
    full = h.build(ep_size=1, ep_rank=0)
    full_params = sum(t.numel() for _, b in full.moe_blocks() for t in b.shared_expert_tensors())
    assert ranks[0]["local_expert_params"] * 2 == full_params


# ---- (world, ep) x ZeRO 0/1/2 against one process ----------------------------------------------------
CONFIGS = [(2, 2), (4, 2), (2, 1)]


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"world{w}-ep{e}" for w, e in CONFIGS])
def ep_run(request, tmp_path_factory):
    world, ep = request.param
    out = tmp_path_factory.mktemp(f"w{world}ep{ep}") / "ranks.pt"
    mp.spawn(h.ep_training_worker, args=(world, free_port(), str(out), ep), nprocs=world, join=True)
    return world, ep, torch.load(out, weights_only=False), h.reference_training(world)


def test_outputs_losses_and_every_gradient_match_one_process(ep_run):
    world, ep, ranks, ref = ep_run
    for rank, record in enumerate(ranks):
        torch.testing.assert_close(record["output"], ref["outputs"][rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(record["loss"], ref["losses"][rank], rtol=1e-5, atol=1e-6)
        for name, grad in ref["dense"].items():
            torch.testing.assert_close(record["dense"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        # this rank's experts (global ids ep_rank * local ...): the replicas on other ranks hold the same
        assert {k[1] for k in record["experts"]} == {e for e in range(4) if e // (4 // ep) == rank % ep}
        for key, grad in record["experts"].items():
            torch.testing.assert_close(grad, ref["experts"][key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_the_norm_used_for_clipping_is_the_one_process_norm(ep_run, stage):
    """DeepSpeed's ZeRO-0 clipping averages per-rank norms (issue 8475); under expert parallelism each rank
    holds other experts, so that is not the model's norm. Every step here is clipped (norm > CLIP)."""
    world, ep, ranks, ref = ep_run
    assert min(ref["norms"]) > h.CLIP
    for record in ranks:
        assert record[f"zero{stage}"]["norms"] == pytest.approx(ref["norms"], rel=1e-5)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_parameters_after_clipped_decayed_steps_match_one_process(ep_run, stage):
    world, ep, ranks, ref = ep_run
    for record in ranks:
        params = record[f"zero{stage}"]["params"]
        assert set(params) <= set(ref["params"])
        for key, value in params.items():
            torch.testing.assert_close(value, ref["params"][key], rtol=1e-4, atol=5e-6, msg=lambda m: f"{key}: {m}")
    held = set().union(*(r[f"zero{stage}"]["params"] for r in ranks))
    assert held == set(ref["params"])   # every global expert lives on some rank


def test_expert_replicas_stay_identical(ep_run):
    world, ep, ranks, _ = ep_run
    for stage in (0, 1, 2):
        for rank in range(ep, world):   # rank r replicates the experts of rank r % ep
            mine, first = ranks[rank][f"zero{stage}"]["params"], ranks[rank % ep][f"zero{stage}"]["params"]
            assert mine.keys() == first.keys()
            for key in mine:
                assert torch.equal(mine[key], first[key]), (stage, rank, key)


def test_reported_expert_loads_are_the_rows_the_experts_computed(ep_run):
    """The gate's per-task loads count dispatched routes: summed over tasks and ranks they equal the rows
    each expert's computation received (counted inside the experts), expert by expert."""
    world, ep, ranks, _ = ep_run
    for layer in ranks[0]["reported"]:
        reported = sum(r["reported"][layer] for r in ranks)
        for expert in range(4):
            received = sum(r["received"].get((layer, expert), 0) for r in ranks)
            assert reported[expert].item() == received, (layer, expert)
        assert reported.sum() == world * 2 * (h.BATCH // world) * 2   # rows x tasks x top-2


def test_the_compact_dispatch_runs_no_deepspeed_capacity_all_reduce(ep_run):
    """DeepSpeed's no-drop gating all-reduces the busiest expert's load to size its buffers; the compact
    dispatch sizes its own, so the gate skips that collective."""
    _, _, ranks, _ = ep_run
    assert all(r["deepspeed_all_reduces_in_forward"] == 0 for r in ranks)


@pytest.mark.parametrize("stage", [1, 2])
def test_the_bf16_clipping_norm_is_the_norm_of_the_whole_model(ep_run, stage):
    """bf16 (ZeRO 1/2; stage 0 with bf16 is refused by the config check): DeepSpeed's clipping norm equals
    the norm computed from the same reduced gradients with every expert counted once (the experts hold
    about 1 % of the squared norm here, so leaving them out, or averaging them over ranks, is off by far
    more than the 1e-4 allowed), and the fp32 process's norm to bf16 precision."""
    world, ep, ranks, ref = ep_run
    for record in ranks:
        run = record[f"bf16_zero{stage}"]
        assert run["norms"] == pytest.approx(run["own_norms"], rel=1e-4)
        assert run["norms"] == pytest.approx(ref["norms"], rel=2e-2)


# ---- --expert_optimizer lazy: replicas agree, and 2 or 4 processes step like one ----------------------------
LAZY = [(4, 2), (2, 2)]
LAZY_MODEL = {"num_experts": 16, "top_k": 1}   # 16 routes a step over 16 experts: some experts idle


@pytest.fixture(scope="module", params=LAZY, ids=[f"world{w}-ep{e}" for w, e in LAZY])
def lazy_run(request, tmp_path_factory):
    world, ep = request.param
    out = tmp_path_factory.mktemp(f"lazy{world}{ep}") / "ranks.pt"
    mp.spawn(h.ep_training_worker, args=(world, free_port(), str(out), ep, "lazy", ((1, False), (2, False)),
                                         LAZY_MODEL), nprocs=world, join=True)
    return world, ep, torch.load(out, weights_only=False), h.reference_training(world, grouped=True,
                                                                                expert_mode="lazy", **LAZY_MODEL)


@pytest.mark.parametrize("stage", [1, 2])
def test_lazy_expert_steps_under_expert_parallelism_match_one_process(lazy_run, stage):
    """Only the experts that received rows anywhere (the replicas sum their row counts first) step, each with
    its own step count: every rank's weights after 3 clipped steps equal one process's lazy run, and the
    replicas of an expert stay identical (world 4, ep 2: ranks r and r + 2 hold the same experts)."""
    world, ep, ranks, ref = lazy_run
    steps = torch.cat(list(ref["expert_steps"].values()))
    assert steps.min() < h.STEPS and steps.max() == h.STEPS   # some experts waited, some stepped every time
    for record in ranks:
        for key, value in record[f"zero{stage}"]["params"].items():
            torch.testing.assert_close(value, ref["params"][key], rtol=1e-4, atol=5e-6, msg=lambda m: f"{key}: {m}")
    for rank in range(ep, world):
        mine, first = ranks[rank][f"zero{stage}"]["params"], ranks[rank % ep][f"zero{stage}"]["params"]
        assert all(torch.equal(mine[k], first[k]) for k in mine)


@pytest.mark.parametrize("worker", [h.eval_padding_worker, h.eval_padding_worker_deepspeed_layer],
                         ids=["expert-banks", "deepspeed-moe-layer"])
def test_evaluation_padding_under_a_capacity_changes_no_real_prediction(tmp_path, worker):
    """--eval_capacity_factor with ep 2 where one rank's last batch is half padding: the padding takes no slot,
    each rank drops by its own real rows' capacity and the ranks agree on the dispatch buffers (else the
    all-to-all would not match), so every real row is predicted as one process predicts it in a batch of
    its own rows (issue 23)."""
    ranks = _spawn(worker, tmp_path / "ep2.pt")
    _one_process(h.eval_padding_reference, tmp_path / "ep1.pt")
    ref = torch.load(tmp_path / "ep1.pt", weights_only=False)
    assert all(r["dropped"].sum() > 0 for r in ref)   # the capacity binds on both ranks
    for rank, expected in zip(ranks, ref):
        for key in ("sentiment", "emotion", "dropped"):
            torch.testing.assert_close(rank[key], expected[key], rtol=1e-5, atol=1e-6)


# ---- --route_per step: every valid time step routed, experts split over 2 processes, against one process -----------
STEP_MODEL = {"route_per": "step", "num_experts": 8}


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("step") / "ranks.pt"
    mp.spawn(h.ep_training_worker, args=(2, free_port(), str(out), 2, "dense", ((0, False), (2, True)), STEP_MODEL),
             nprocs=2, join=True)
    return torch.load(out, weights_only=False), h.reference_training(2, **STEP_MODEL)


def test_step_routing_under_expert_parallelism_trains_like_one_process(step_run):
    """2 processes on the fast path (each rank's valid steps dispatched to the rank holding their experts) against
    one process running DeepSpeed's per-expert loop: the first step's outputs, loss and every gradient, the
    parameters after three clipped, decayed steps (ZeRO 0), and the bf16 ZeRO-2 run's clipping norms."""
    ranks, ref = step_run
    for rank, record in enumerate(ranks):
        torch.testing.assert_close(record["output"], ref["outputs"][rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(record["loss"], ref["losses"][rank], rtol=1e-5, atol=1e-6)
        for name, grad in ref["dense"].items():
            torch.testing.assert_close(record["dense"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        for key, grad in record["experts"].items():
            torch.testing.assert_close(grad, ref["experts"][key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
        for key, value in record["zero0"]["params"].items():
            torch.testing.assert_close(value, ref["params"][key], rtol=1e-4, atol=5e-6, msg=lambda m: f"{key}: {m}")
        assert record["bf16_zero2"]["norms"] == pytest.approx(ref["norms"], rel=2e-2)
    assert set(ranks[0]["experts"]) | set(ranks[1]["experts"]) == set(ref["experts"])


def test_step_routing_loads_count_every_valid_step_once_and_the_experts_computed_them(step_run):
    """Per layer, the reported loads summed over ranks equal the rows the experts computed, expert by expert, and
    total tasks x top-2 x the valid steps of the global batch: padded steps are never routed."""
    ranks, _ = step_run
    batch = h.step_batch(0)
    slices = [h.step_batch(0, r, 2) for r in range(2)]   # the ranks route different numbers of rows
    assert int(slices[0].masks["text"].sum()) != int(slices[1].masks["text"].sum())
    for layer in ranks[0]["reported"]:
        reported = sum(r["reported"][layer] for r in ranks)
        for expert in range(STEP_MODEL["num_experts"]):
            received = sum(r["received"].get((layer, expert), 0) for r in ranks)
            assert reported[expert].item() == received, (layer, expert)
        valid_steps = int(batch.masks[layer.split(".")[0]].sum())
        assert valid_steps < h.BATCH * h.SHAPES[layer.split(".")[0]][0]   # the batch has padded steps
        assert reported.sum().item() == 2 * 2 * valid_steps


def test_step_routing_on_deepspeeds_own_layer_agrees_on_buffers_when_ranks_route_different_rows(tmp_path):
    """DeepSpeed's MOELayer sizes its all-to-all buffers by a capacity: top-1 without a limit capped it by the rank's
    own rows, with a limit each rank computes it from its own rows, so ranks holding different numbers of valid
    steps (or none: an all-padding evaluation batch) exchanged buffers of different shapes. The ranks now agree,
    and every rank's rows are predicted as one process predicts them on their own."""
    ranks = _spawn(h.step_rows_on_deepspeeds_layer, tmp_path / "ep2.pt")
    _one_process(h.step_rows_reference, tmp_path / "ep1.pt")
    ref = torch.load(tmp_path / "ep1.pt", weights_only=False)
    for factor in (0.0, 0.5):
        assert ranks[0][factor]["valid_steps"] != ranks[1][factor]["valid_steps"]
        for rank in range(2):
            torch.testing.assert_close(ranks[rank][factor]["train"], ref[factor]["train"][rank], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[0][factor]["eval"], ref[factor]["eval"], rtol=1e-5, atol=1e-6)
        assert ranks[1][factor]["eval"].numel() == 0
    assert any(r[0.5]["dropped"].sum() > 0 for r in ranks)   # the training capacity binds


def test_a_saves_state_assembly_meets_every_data_parallel_group_in_order(tmp_path):
    """A checkpoint's topology-free state assembles every parameter from its ZeRO fragments with one all-reduce
    per bucket of parameters sharing a data-parallel group. With a group of all ranks and a group of each rank
    alone interleaved, in small buckets, every rank's kept parameters come out whole and nothing hangs."""
    for rank, record in enumerate(_spawn(h.assembly_worker, tmp_path / "assembled.pt")):
        for key, expected in record["expected"].items():
            assembled = record["assembled"][key]
            assert sorted(assembled) == sorted(expected) == [0, 2, 3, 4], (rank, key)   # only the kept ones
            for i, value in expected.items():
                assert torch.equal(assembled[i], value), (rank, key, i)
