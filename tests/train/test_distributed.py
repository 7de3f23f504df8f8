"""Expert and data parallelism over real processes (gloo, CPU), the launch environment, and the launch scripts.

- Layout equivalence: the real `Trainer` on 2 processes (ep_size=2; ep_size=1; ep_size=2 with ZeRO-2) reports the
  per-step losses, gradient norms, validation losses and per-expert token counts of the 1-process run on the same
  global batch, and every rank runs every MoE layer the same number of times (across an epoch boundary and a
  wrapped validation split too).
- Bad layouts end every rank within seconds with a message that names the key or the address.
- `resolve_env` for torchrun, the deepspeed launcher, srun and the sbatch batch step; `expand_nodelist`.
- launch/: `bash -n`, and the scripts rendered with `srun`/`scontrol`/`torchrun`/`deepspeed`/`moe-lm` stubs on PATH,
  including SIGUSR1 reaching the trainer processes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_lm.config.schema import ConfigError, ParallelConfig
from moe_lm.train.distributed import (DistEnv, DistributedInitError, check_layout, expand_nodelist, free_port,
                                      resolve_env)
from tests.distributed_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega red green blue cyan black white def class return import for while if else").split()
NUM_LAYERS, NUM_EXPERTS, MAX_STEPS, EVAL_BATCHES = 2, 4, 4, 2
GLOBAL_BATCH = 8  # sequences per optimizer step: 1 process x 8, or 2 processes x 4


# ---------------------------------------------------------------------------------------------------------------
# Layout equivalence: 1 process vs 2 processes on the same global batch
# ---------------------------------------------------------------------------------------------------------------

def tiny_overrides(root: Path, run: str, world: int, ep_size: int, zero_stage: int = 0) -> list[str]:
    """d_model 32, 2 MoE layers of 4 experts, top-2, seq 32, dropless (capacity cannot differ between layouts)."""
    return [f"data.sources=[{root / 'corpus'}]", f"data.dir={root / 'data'}", "data.vocab_size=300",
            "data.val_fraction=0.2", "model.vocab_size=300", "model.seq_len=32", f"model.n_layers={NUM_LAYERS}",
            "model.d_model=32", "model.n_heads=4", "model.d_ff=64", f"model.moe.num_experts={NUM_EXPERTS}",
            "model.moe.top_k=2", "model.moe.drop_tokens=false", f"train.micro_batch_size={GLOBAL_BATCH // world}",
            f"train.max_steps={MAX_STEPS}", "train.log_interval=1", "train.eval_interval=2",
            f"train.eval_batches={EVAL_BATCHES}", "train.warmup_steps=1", "train.grad_clip=0.5",
            "metrics.per_layer=true", "wandb.mode=disabled", f"parallel.ep_size={ep_size}",
            f"parallel.zero_stage={zero_stage}", "parallel.init_timeout_s=60", f"run.dir={root / run}"]


def _train_worker(rank: int, world: int, runs: list[tuple[str, list[str]]], out_dir: str) -> None:
    """Train each (name, overrides) of `runs` in turn in this process group; save what the test compares."""
    from moe_lm.config import load_config
    from moe_lm.train import Trainer

    for name, overrides in runs:
        env = DistEnv(rank, world, rank, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), "test")
        trainer = Trainer(load_config(None, overrides), env=env, progress=False)
        calls = [0] * NUM_LAYERS  # forwards of each MoE layer, training and evaluation
        for layer, moe in enumerate(trainer.model.moe_layers()):
            moe.register_forward_hook(lambda *_, layer=layer, calls=calls: calls.__setitem__(layer, calls[layer] + 1))
        counts = []  # per step: the tracker's global assignment counts [layer][expert]
        train_step = trainer._train_step

        def recorded_step(log=True, train_step=train_step, trainer=trainer, counts=counts):
            metrics = train_step(log=log)  # log_interval=1: every step reduces the routing counts
            counts.append([trainer.tracker.layer_counts(layer).tolist() for layer in range(NUM_LAYERS)])
            return metrics

        trainer._train_step = recorded_step
        trainer.train()
        Path(out_dir, f"{name}.rank{rank}.json").write_text(json.dumps(
            {"counts": counts, "calls": calls, "groups": process_groups(trainer)}))


def process_groups(trainer) -> dict:
    """Which ranks share the all-to-all and the expert-gradient all-reduce, which experts this rank holds, and
    whether exactly the expert parameters are marked for the expert-data-parallel reduction."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    name = f"ep_size_{trainer.cfg.parallel.ep_size}"
    params = dict(trainer.model.named_parameters())
    return {"ep": dist.get_process_group_ranks(groups._get_expert_parallel_group(name)),
            "expert_dp": dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name)),
            "experts": trainer.model.moe_layers()[0].global_expert_ids,
            "moe_params_are_experts": {n for n, p in params.items() if is_moe_param(p)}
                                      == {n for n in params if ".deepspeed_experts." in n},
            "moe_group_names": sorted({p.group_name for p in params.values() if is_moe_param(p)})}


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory):
    """The 1-process reference and three 2-process layouts (one spawn: the runs share its process group)."""
    root = tmp_path_factory.mktemp("layouts")
    (root / "corpus").mkdir()
    rng = random.Random(0)
    for i in range(12):  # ~29 training and 2 validation sequences: 4 steps x 8 cross an epoch, validation wraps
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40)))
        (root / "corpus" / f"doc{i:02d}.txt").write_text(words + "\n")
    out = root / "out"
    out.mkdir()
    started = time.monotonic()
    run_distributed(_train_worker, 1, [("single", tiny_overrides(root, "single", 1, 1))], str(out), timeout_s=300)
    run_distributed(_train_worker, 2, [("ep2", tiny_overrides(root, "ep2", 2, 2)),
                                       ("dp2", tiny_overrides(root, "dp2", 2, 1)),
                                       ("ep2_zero2", tiny_overrides(root, "ep2_zero2", 2, 2, zero_stage=2))],
                    str(out), timeout_s=300)
    print(f"layout runs: {time.monotonic() - started:.1f} s")
    return root


def metrics_rows(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_the_tiny_run_crosses_an_epoch_and_wraps_the_validation_split(layout_runs):
    from moe_lm.data import PackedDataset, open_split

    train = PackedDataset(open_split(layout_runs / "data", "train"), 32)
    val = PackedDataset(open_split(layout_runs / "data", "val"), 32)
    assert len(train) < MAX_STEPS * GLOBAL_BATCH  # the last steps draw from the second epoch
    assert len(val) < EVAL_BATCHES * GLOBAL_BATCH  # the fixed validation prefix wraps around


@pytest.mark.parametrize("layout", ["ep2", "dp2", "ep2_zero2"])
def test_two_processes_report_the_numbers_of_one_process(layout_runs, layout):
    single, multi = metrics_rows(layout_runs / "single"), metrics_rows(layout_runs / layout)
    assert sorted(single) == sorted(multi) == list(range(1, MAX_STEPS + 1))
    for step in single:
        a, b = single[step], multi[step]
        for key in ("train/loss", "train/aux_loss", "train/grad_norm", "val/loss"):
            assert (key in a) == (key in b), (step, key)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (layout, step, key, a[key], b[key])
        shares = [f"moe/layer{i}/share/e{j}" for i in range(NUM_LAYERS) for j in range(NUM_EXPERTS)]
        assert [b[k] for k in shares] == pytest.approx([a[k] for k in shares], abs=1e-7), (layout, step)
    assert all(row["train/grad_norm"] == row["train/grad_norm"] for row in single.values())  # reported, not NaN
    assert "val/loss" in single[2] and "val/loss" in single[MAX_STEPS]


@pytest.mark.parametrize("layout", ["ep2", "dp2", "ep2_zero2"])
def test_per_expert_token_counts_equal_the_single_process_counts(layout_runs, layout):
    out = layout_runs / "out"
    reference = json.loads((out / "single.rank0.json").read_text())
    tokens_per_step = GLOBAL_BATCH * 32 * 2  # sequences x tokens x top-2 assignments
    assert all(sum(layer) == tokens_per_step for step in reference["counts"] for layer in step)
    for rank in (0, 1):
        record = json.loads((out / f"{layout}.rank{rank}.json").read_text())
        assert record["counts"] == reference["counts"]  # exact: integers, summed over the ranks


@pytest.mark.parametrize("layout, expected", [
    ("single", [{"ep": [0], "expert_dp": [0], "experts": [0, 1, 2, 3]}]),
    ("dp2", [{"ep": [0], "expert_dp": [0, 1], "experts": [0, 1, 2, 3]},
             {"ep": [1], "expert_dp": [0, 1], "experts": [0, 1, 2, 3]}]),
    ("ep2", [{"ep": [0, 1], "expert_dp": [0], "experts": [0, 1]}, {"ep": [0, 1], "expert_dp": [1], "experts": [2, 3]}]),
])
def test_expert_parallel_groups_and_expert_parameter_groups(layout_runs, layout, expected):
    """EP groups of consecutive ranks (all-to-all); expert gradients reduced over the ranks holding the same
    experts only; dense gradients over all ranks."""
    for rank, want in enumerate(expected):
        got = json.loads((layout_runs / "out" / f"{layout}.rank{rank}.json").read_text())["groups"]
        assert {k: got[k] for k in want} == want, (layout, rank)
        assert got["moe_params_are_experts"] and got["moe_group_names"] == [f"ep_size_{len(want['ep'])}"]


@pytest.mark.parametrize("layout", ["single", "ep2", "dp2", "ep2_zero2"])
def test_every_rank_runs_every_moe_layer_the_same_number_of_times(layout_runs, layout):
    expected = MAX_STEPS + 2 * EVAL_BATCHES  # one micro-batch per step; evaluations at steps 2 and 4
    ranks = (0,) if layout == "single" else (0, 1)
    for rank in ranks:
        record = json.loads((layout_runs / "out" / f"{layout}.rank{rank}.json").read_text())
        assert record["calls"] == [expected] * NUM_LAYERS, (layout, rank)


# ---------------------------------------------------------------------------------------------------------------
# Bad layouts and an unreachable master end every rank quickly with a message naming the cause
# ---------------------------------------------------------------------------------------------------------------

def launch_ranks(overrides_per_rank: list[list[str]], env_per_rank: list[dict], timeout_s: float):
    """Start `moe-lm train recipes/quickstart.yaml ...` once per rank as independent processes (as a launcher
    would, but without torchrun stopping the others when the first fails); return (returncode, stderr) per rank
    and the wall time."""
    started = time.monotonic()
    procs = []
    for overrides, extra_env in zip(overrides_per_rank, env_per_rank):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_"))}
        env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", **extra_env)
        procs.append(subprocess.Popen([sys.executable, "-m", "moe_lm.cli", "train", "recipes/quickstart.yaml",
                                       *overrides], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            _, stderr = proc.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - started)))
            results.append((proc.returncode, stderr))
    finally:
        for proc in procs:  # only the processes started here
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results, time.monotonic() - started


def rank_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def test_world_size_not_divisible_by_ep_size_fails_on_every_rank(tmp_path):
    port = free_port()
    overrides = ["parallel.ep_size=4", "model.moe.num_experts=4", f"run.dir={tmp_path}"]
    results, elapsed = launch_ranks([overrides, overrides], [rank_env(0, 2, port), rank_env(1, 2, port)], 120)
    for rank, (code, stderr) in enumerate(results):
        assert code != 0
        assert f"rank {rank}/2: config error: parallel.ep_size: world size 2 is not divisible by ep_size=4" in stderr
    assert elapsed < 60


def test_experts_not_divisible_by_ep_size_fails_on_every_rank(tmp_path):
    port = free_port()
    overrides = ["parallel.ep_size=2", "model.moe.num_experts=3", f"run.dir={tmp_path}"]
    # rank 1 also gets the --local_rank=1 argument that DeepSpeed's launcher appends
    results, elapsed = launch_ranks([overrides, [*overrides, "--local_rank=1"]],
                                    [rank_env(0, 2, port), rank_env(1, 2, port)], 120)
    for rank, (code, stderr) in enumerate(results):
        assert code != 0
        assert (f"rank {rank}/2: config error: parallel.ep_size: model.moe.num_experts=3 is not divisible by "
                f"parallel.ep_size=2") in stderr
    assert elapsed < 60


def test_a_rank_that_cannot_reach_the_master_ends_both_ranks_with_the_address(tmp_path):
    master_port, wrong_port = free_port(), free_port()  # nothing listens on wrong_port
    overrides = ["parallel.init_timeout_s=3", f"run.dir={tmp_path}"]
    results, elapsed = launch_ranks([overrides, overrides],
                                    [rank_env(0, 2, master_port), rank_env(1, 2, wrong_port)], 150)
    for rank, port in ((0, master_port), (1, wrong_port)):
        code, stderr = results[rank]
        assert code != 0
        assert (f"moe-lm: distributed launch error: rank {rank}/2: could not join the process group at "
                f"127.0.0.1:{port} within 3 s (parallel.init_timeout_s") in stderr, stderr[-2000:]
    assert elapsed < 90


def test_check_layout_names_the_key():
    check_layout(ParallelConfig(ep_size=2), world_size=4, num_experts=8)
    with pytest.raises(ConfigError, match=r"parallel.ep_size: world size 6 is not divisible by ep_size=4"):
        check_layout(ParallelConfig(ep_size=4), world_size=6, num_experts=8)
    with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by ep_size=4"):
        check_layout(ParallelConfig(ep_size=4), world_size=8, num_experts=6)


def test_zero_stage_3_is_refused_with_the_reason():
    from moe_lm.config import load_config

    with pytest.raises(ConfigError, match="parallel.zero_stage: .*not supported with ZeRO-3"):
        load_config(None, ["parallel.zero_stage=3"])


# ---------------------------------------------------------------------------------------------------------------
# resolve_env and expand_nodelist
# ---------------------------------------------------------------------------------------------------------------

def test_torchrun_environment():
    env = resolve_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x",
                       "GROUP_RANK": "1"})
    assert env == DistEnv(5, 8, 1, "node0", 29400, "env")


def test_deepspeed_launcher_environment():
    # deepspeed.launcher.launch exports these (and CUDA_VISIBLE_DEVICES) and appends --local_rank=N
    env = resolve_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29611", "CUDA_VISIBLE_DEVICES": "0,1", "CROSS_RANK": "0"})
    assert env == DistEnv(1, 2, 1, "127.0.0.1", 29611, "env")


def test_srun_task_environment():
    base = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08],login1"}
    envs = [resolve_env({**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 2)}) for r in range(4)]
    assert [e.rank for e in envs] == [0, 1, 2, 3] and {e.world_size for e in envs} == {4}
    assert [e.local_rank for e in envs] == [0, 1, 0, 1]
    # the first node of the step, and the port the multi-node sbatch script derives from the job id too
    assert {(e.master_addr, e.master_port, e.launcher) for e in envs} == {("gpu07", 24242, "slurm")}
    explicit = resolve_env({**base, "SLURM_PROCID": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (explicit.master_addr, explicit.master_port) == ("10.0.0.1", 1234)


def test_torchrun_under_srun_takes_torchruns_ranks():
    env = resolve_env({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
                       "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "24242"})
    assert env == DistEnv(9, 16, 1, "n1", 24242, "env")


def test_the_sbatch_batch_step_is_one_process_not_rank_0_of_the_allocation():
    # what the batch script itself sees (no SLURM_STEP_*): SLURM_NTASKS is the allocation's task count
    env = resolve_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16",
                       "SLURM_JOB_NODELIST": "gpu[01-02]"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_no_launcher_is_a_world_of_one():
    env = resolve_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single") and env.master_port > 0


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not a rank of a world of WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "gpu[1-"}, "SLURM_STEP_NODELIST"),
])
def test_inconsistent_launch_environments_are_named(environ, message):
    with pytest.raises(DistributedInitError, match=message.replace("[", r"\[")):
        resolve_env(environ)


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[8-10]", ["a8", "a9", "a10"]),
    ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),
    ("x[1],y[3-4],z", ["x1", "y3", "y4", "z"]),
    ("gpu-a100-[1,3]", ["gpu-a100-1", "gpu-a100-3"]),
    ("host.domain.org", ["host.domain.org"]),
    ("", []),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[1-", "gpu1]", "gpu[a-b]", "gpu[3-1]", "gpu[[1]]"])
def test_expand_nodelist_rejects_malformed_lists(nodelist):
    with pytest.raises(ValueError, match="node list"):
        expand_nodelist(nodelist)


# ---------------------------------------------------------------------------------------------------------------
# launch/ scripts
# ---------------------------------------------------------------------------------------------------------------

def test_launch_scripts_exist_and_parse():
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "torchrun.sh", "deepspeed.sh", "slurm_single_node.sbatch",
            "slurm_multi_node.sbatch"} <= names
    assert (LAUNCH / "hostfile.example").is_file()
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)


STUB_ENV_KEYS = ["MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "SLURM_NODEID", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "NNODES", "NPROC_PER_NODE", "RDZV_ID"]

STUB_LOGGER = f"""#!{sys.executable}
import json, os, signal, subprocess, sys, time
KEYS = {STUB_ENV_KEYS!r}
def log(**record):
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(json.dumps(record) + "\\n")
"""

STUBS = {
    # torchrun / deepspeed: log the call; torchrun also starts STUB_WORKERS copies of the entrypoint
    "torchrun": STUB_LOGGER + """
args = sys.argv[1:]
log(cmd="torchrun", args=args, env={k: os.environ.get(k) for k in KEYS})
entry = next(i for i, a in enumerate(args) if a.endswith("moe-lm"))
workers = [subprocess.Popen([sys.executable, *args[entry:]], env=dict(os.environ, RANK=str(r)))
           for r in range(int(os.environ.get("STUB_WORKERS", "0")))]
sys.exit(max([w.wait() for w in workers], default=0))
""",
    "deepspeed": STUB_LOGGER + """
log(cmd="deepspeed", args=sys.argv[1:], env={k: os.environ.get(k) for k in KEYS})
""",
    # a trainer: checkpoints (here: logs) and exits 75 on SIGUSR1, like moe_lm/train/faults.py + cli.py
    "moe-lm": STUB_LOGGER + """
def on_usr1(signum, frame):
    log(cmd="trainer-usr1", rank=os.environ.get("RANK"))
    sys.exit(75)
signal.signal(signal.SIGUSR1, on_usr1)
log(cmd="trainer-start", rank=os.environ.get("RANK"), args=sys.argv[1:])
deadline = time.monotonic() + float(os.environ.get("STUB_TRAIN_S", "0"))
while time.monotonic() < deadline:
    time.sleep(0.02)
""",
    # srun: run the command once per node of the job (one task per node), with the task's SLURM variables
    "srun": STUB_LOGGER + """
args = sys.argv[1:]
options = [a for a in args[:next(i for i, a in enumerate(args) if not a.startswith("-"))]]
command = args[len(options):]
log(cmd="srun", args=options)
hosts = os.environ["STUB_HOSTS"].split()
codes = []
for node, host in enumerate(hosts):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0", HOSTNAME=host,
               SLURM_STEP_NUM_TASKS=str(len(hosts)), SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"])
    codes.append(subprocess.call(command, env=env))
sys.exit(max(codes))
""",
    "scontrol": STUB_LOGGER + """
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ["STUB_HOSTS"].split()))
else:
    log(cmd="scontrol", args=sys.argv[1:])
""",
}


@pytest.fixture
def stubs(tmp_path):
    """A PATH directory of stubs and a clean environment for running the launch scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "STUB_LOG": str(log), "HOSTNAME": "testhost"}

    def calls(cmd: str | None = None) -> list[dict]:
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return [row for row in rows if cmd is None or row["cmd"] == cmd]

    return bin_dir, env, calls


def run_script(script: str, args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def emulate_torchrun_ranks(call: dict, nnodes: int, nproc: int, master: tuple[str, int]) -> list[DistEnv]:
    """The environment torchrun gives the workers of node SLURM_NODEID, resolved by moe-lm."""
    node = int(call["env"]["SLURM_NODEID"])
    return [resolve_env({"RANK": str(node * nproc + local), "WORLD_SIZE": str(nnodes * nproc),
                         "LOCAL_RANK": str(local), "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])})
            for local in range(nproc)]


def test_multi_node_sbatch_renders_the_rendezvous_from_the_slurm_environment(stubs):
    bin_dir, env, calls = stubs
    nodelist = "gpu[07-08]"
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4",
               SLURM_CPUS_PER_TASK="16", SLURM_SUBMIT_DIR=str(REPO), STUB_HOSTS=" ".join(expand_nodelist(nodelist)))
    result = run_script("slurm_multi_node.sbatch", ["recipes/quickstart.yaml", "parallel.ep_size=2"], env)
    assert result.returncode == 0, result.stderr
    (srun,) = calls("srun")
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1"} <= set(srun["args"])
    torchruns = calls("torchrun")
    assert [c["env"]["SLURM_NODEID"] for c in torchruns] == ["0", "1"]  # one torchrun per node
    for call in torchruns:
        assert call["args"] == ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu07:24242",
                                "--rdzv_id", "4242", "--rdzv_conf", "join_timeout=600", "--nproc_per_node", "4",
                                str(bin_dir / "moe-lm"), "train", "recipes/quickstart.yaml", "train.resume=auto",
                                "parallel.ep_size=2"]
        assert call["env"]["OMP_NUM_THREADS"] == "4"  # 16 cores / 4 processes
        assert (call["env"]["MASTER_ADDR"], call["env"]["MASTER_PORT"]) == ("gpu07", "24242")
    ranks = [e for call in torchruns for e in emulate_torchrun_ranks(call, 2, 4, ("gpu07", 24242))]
    assert sorted(e.rank for e in ranks) == list(range(8)) and {e.world_size for e in ranks} == {8}
    assert {(e.master_addr, e.master_port) for e in ranks} == {("gpu07", 24242)}
    check_layout(ParallelConfig(ep_size=2), 8, 8)
    # srun without torchrun (one task per process) derives the same master from the same variables
    direct = resolve_env({"SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8",
                          "SLURM_STEP_NODELIST": nodelist})
    assert (direct.master_addr, direct.master_port) == ("gpu07", 24242)
    assert "rendezvous gpu07:24242" in result.stderr


def test_single_node_sbatch_renders_a_standalone_torchrun(stubs):
    bin_dir, env, calls = stubs
    env.update(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu03", SLURM_GPUS_ON_NODE="2", SLURM_CPUS_PER_TASK="8",
               SLURM_SUBMIT_DIR=str(REPO), STUB_HOSTS="gpu03")
    result = run_script("slurm_single_node.sbatch", ["recipes/quickstart.yaml", "train.max_steps=5"], env)
    assert result.returncode == 0, result.stderr
    (call,) = calls("torchrun")
    assert call["args"] == ["--standalone", "--nproc_per_node", "2", str(bin_dir / "moe-lm"), "train",
                            "recipes/quickstart.yaml", "train.resume=auto", "train.max_steps=5"]
    assert call["env"]["OMP_NUM_THREADS"] == "4"
    assert not calls("srun") and not calls("scontrol")  # no srun on one node; no requeue without a signal


def test_sigusr1_to_the_batch_script_reaches_every_trainer_and_requeues(stubs):
    """`#SBATCH --signal=B:USR1@120` signals the batch shell only: it must reach the trainer processes through
    torchrun.sh (torchrun itself ignores it), and the job is requeued once they have exited."""
    bin_dir, env, calls = stubs
    env.update(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu03", SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(REPO),
               STUB_HOSTS="gpu03", STUB_WORKERS="2", STUB_TRAIN_S="60")
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm_single_node.sbatch"), "recipes/quickstart.yaml"], env=env,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(calls("trainer-start")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls("trainer-start")) == 2
        proc.send_signal(signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(c["rank"] for c in calls("trainer-usr1")) == ["0", "1"]
    assert proc.returncode == 75, stderr  # the trainers' exit status, through torchrun (which survived SIGUSR1)
    assert calls("scontrol") == [{"cmd": "scontrol", "args": ["requeue", "77"]}]
    assert "SIGUSR1" in stderr


def test_torchrun_script_defaults_and_multi_node_check(stubs):
    bin_dir, env, calls = stubs
    result = run_script("torchrun.sh", ["recipes/quickstart.yaml", "parallel.ep_size=2"],
                        {**env, "NPROC_PER_NODE": "2"})
    assert result.returncode == 0, result.stderr
    (call,) = calls("torchrun")
    assert call["args"] == ["--standalone", "--nproc_per_node", "2", str(bin_dir / "moe-lm"), "train",
                            "recipes/quickstart.yaml", "parallel.ep_size=2"]
    assert call["env"]["OMP_NUM_THREADS"] == "1"
    result = run_script("torchrun.sh", ["recipes/quickstart.yaml"], {**env, "NNODES": "2"})
    assert result.returncode == 2 and "needs MASTER_ADDR" in result.stderr
    assert run_script("torchrun.sh", [], env).returncode == 2  # usage


def test_deepspeed_script_sets_omp_threads_and_passes_the_hostfile(stubs):
    bin_dir, env, calls = stubs
    result = run_script("deepspeed.sh", ["recipes/quickstart.yaml", "parallel.ep_size=2"],
                        {**env, "NUM_GPUS": "2", "MASTER_PORT": "29611"})
    assert result.returncode == 0, result.stderr
    result = run_script("deepspeed.sh", ["recipes/quickstart.yaml"],
                        {**env, "HOSTFILE": str(LAUNCH / "hostfile.example"), "NUM_GPUS": "8"})
    assert result.returncode == 0, result.stderr
    local, multi = calls("deepspeed")
    assert local["args"] == ["--num_gpus", "2", "--master_port", "29611", str(bin_dir / "moe-lm"), "train",
                             "recipes/quickstart.yaml", "parallel.ep_size=2"]
    assert local["env"]["OMP_NUM_THREADS"] == "1"  # the deepspeed launcher does not set it
    assert multi["args"][:2] == ["--hostfile", str(LAUNCH / "hostfile.example")]
