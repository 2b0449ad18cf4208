"""Resolve where every role runs, and refuse configs that cannot work before anything starts.

Roles: learner ranks (DeepSpeed), rollout engines (vLLM, tensor-parallel), reward actors, the
answerer server (`vllm serve`, optional) and the trajectory queue. On CPU everything shares the
local cores; on GPU every GPU is given to exactly one role, learner first, then engines, then the
answerer.

Two stages, because Ray itself leaves an actor that cannot be scheduled pending forever, and the
user should never be the one who finds that out:
- `resolve(cfg)`: the config alone (model folder, G, GPU arithmetic, weight transport);
- `resolve(cfg, ClusterResources.from_ray())` after `ray.init`: the Ray resources every role
  reserves (`actor_requests`, the same requests the trainer passes to `.options(...)`) against
  what the cluster really has, plus the answerer's port. Each problem is one line naming the key.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from finemem.config import ConfigError
from finemem.model_init import model_folder_problem

# learner/answerer_server.py reserves one CPU (and cluster.answerer_gpus GPUs) for `vllm serve`.
ANSWERER_NUM_CPUS = 1.0

# `rollout.weight_transport` choices (rollout.weight_sync implements them); nccl_cpu is vLLM's
# weight-transfer backend name of the CPU stand-in (rollout.cpu_group_transfer).
CPU_BACKEND = "nccl_cpu"
TRANSPORTS = ("auto", "object_store", "nccl", CPU_BACKEND)


@dataclass(frozen=True)
class ActorRequest:
    """What each of `count` Ray actors of one role asks the scheduler for."""

    role: str  # learner | engine | reward | answerer | queue
    count: int
    num_cpus: float
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources, e.g. {"node_rollout": 1}
    cpu_key: str = ""  # the config key that sets num_cpus (for messages)
    resources_key: str = ""  # the config key that sets `resources`

    def options(self) -> dict:
        """Keyword arguments for `ActorClass.options(...)` (one actor)."""
        out: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            out["resources"] = dict(self.resources)
        return out


@dataclass
class ClusterResources:
    """A snapshot of the Ray cluster: totals (`ray.cluster_resources()`) and each alive node's resources."""

    total: dict[str, float]
    nodes: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_ray(cls) -> ClusterResources:
        """Read the connected Ray cluster (call after `ray.init`)."""
        import ray

        nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
        return cls(total=dict(ray.cluster_resources()), nodes=nodes)


@dataclass
class Placement:
    device: str  # "cpu" | "cuda"
    learner_gpus: list[list[int]] = field(default_factory=list)  # one list per rank
    engine_gpus: list[list[int]] = field(default_factory=list)  # one list per engine (TP group)
    answerer_gpus: list[int] = field(default_factory=list)
    num_reward_actors: int = 1
    weight_transport: str = "object_store"  # resolved: never "auto"; learner and engines both use it
    requests: list[ActorRequest] = field(default_factory=list)

    def request(self, role: str) -> ActorRequest:
        for r in self.requests:
            if r.role == role:
                return r
        raise KeyError(f"no actor request for role {role!r}")

    def describe(self) -> str:
        if self.device == "cpu":
            return (f"cpu: {len(self.learner_gpus) or 1} learner rank(s), {len(self.engine_gpus) or 1} engine(s), "
                    f"{self.num_reward_actors} reward actor(s), weights over {self.weight_transport}")
        return (f"cuda: learner ranks on GPUs {self.learner_gpus}, engines on {self.engine_gpus}, "
                f"answerer on {self.answerer_gpus or 'an external endpoint'}, {self.num_reward_actors} reward actors, "
                f"weights over {self.weight_transport}")


def _resources(value) -> dict[str, float]:
    return {str(k): float(v) for k, v in dict(value or {}).items()}


def actor_requests(cfg) -> list[ActorRequest]:
    """Every Ray actor the trainer starts, per role: the one source of its `.options(...)`."""
    c = cfg.cluster
    on_gpu = int(c.num_gpus) > 0
    out = [
        ActorRequest("learner", int(cfg.learner.num_ranks), float(cfg.learner.actor_num_cpus),
                     1.0 if on_gpu and int(c.learner_gpus) > 0 else 0.0, _resources(c.learner_resources),
                     "learner.actor_num_cpus", "cluster.learner_resources"),
        ActorRequest("engine", int(cfg.rollout.num_engines), float(cfg.rollout.actor_num_cpus),
                     float(cfg.rollout.tensor_parallel_size) if on_gpu else 0.0, _resources(c.rollout_resources),
                     "rollout.actor_num_cpus", "cluster.rollout_resources"),
        ActorRequest("reward", int(cfg.reward.num_actors), float(cfg.reward.actor_num_cpus), cpu_key="reward.actor_num_cpus"),
    ]
    if c.answerer_serve:
        out.append(ActorRequest("answerer", 1, ANSWERER_NUM_CPUS, float(c.answerer_gpus) if on_gpu else 0.0))
    out.append(ActorRequest("queue", 1, 0.0))  # trainer._make_queue: num_cpus=0
    return out


def resolve_weight_transport(cfg, device: str) -> tuple[str, str | None]:
    """(transport, problem): "auto" -> nccl on cuda, object_store on cpu. `rollout.weight_sync`
    implements the transports named in TRANSPORTS."""
    name = str(cfg.rollout.weight_transport)
    if name not in TRANSPORTS:
        return name, f"rollout.weight_transport={name}: choose one of {', '.join(TRANSPORTS)}"
    learner_on_cpu = device == "cuda" and int(cfg.cluster.learner_gpus) == 0
    if name == "auto":
        return ("nccl" if device == "cuda" and not learner_on_cpu else "object_store"), None
    if name == "nccl" and learner_on_cpu:
        return name, ("rollout.weight_transport=nccl needs the learner on a GPU, but cluster.learner_gpus=0 puts "
                      "it on the CPU; set rollout.weight_transport=auto or object_store")
    if name == "nccl" and device != "cuda":
        return name, ("rollout.weight_transport=nccl needs CUDA GPUs but this placement is on CPU "
                      f"(cluster.num_gpus={cfg.cluster.num_gpus}); set rollout.weight_transport=auto or "
                      "object_store, or use a GPU cluster preset")
    if name == CPU_BACKEND and device == "cuda":  # the CPU stand-in of nccl (gloo group)
        return name, (f"rollout.weight_transport={name} is the CPU stand-in of nccl, but this placement is on "
                      f"GPUs (cluster.num_gpus={cfg.cluster.num_gpus}); set rollout.weight_transport=nccl or auto")
    return name, None


def validate(cfg, cluster: ClusterResources | None = None) -> list[str]:
    """Everything that makes the config unworkable, each with what to change. Empty list: fine.

    Without `cluster` only the config is checked; with it, also what the roles reserve against it."""
    problems: list[str] = []
    if cfg.rollout.group_size < 2:
        problems.append(f"rollout.group_size={cfg.rollout.group_size}: GRPO needs at least 2 rollouts per "
                        "instance; set rollout.group_size=2 or more (8 in the paper)")
    model_problem = model_folder_problem(cfg.model.path)
    if model_problem:
        problems.append(f"model.path={model_problem}, or point model.path at a local checkout of the model")
    if cfg.algo.advantage not in ("step_group", "pooled", "outcome"):
        problems.append(f"algo.advantage={cfg.algo.advantage}: choose step_group, pooled or outcome")
    if cfg.reward.preset not in ("finemem", "outcome_only", "csr_only", "eara_only", "memalpha"):
        problems.append(f"reward.preset={cfg.reward.preset}: choose finemem, outcome_only, csr_only, eara_only "
                        "or memalpha")
    if cfg.learner.num_ranks < 1 or cfg.rollout.num_engines < 1:
        problems.append("learner.num_ranks and rollout.num_engines must be at least 1")
    if cfg.algo.max_staleness < 0:
        problems.append("algo.max_staleness must be >= 0 (0 = fully on-policy)")
    if cfg.algo.ppo_epochs < 1 or cfg.algo.mini_batches < 1:
        problems.append(f"algo.ppo_epochs={cfg.algo.ppo_epochs}, algo.mini_batches={cfg.algo.mini_batches}: "
                        "both must be >= 1 (1 and 1 = one optimizer step per training step)")
    elif cfg.algo.mini_batches > cfg.learner.instances_per_step * cfg.rollout.group_size:
        problems.append(f"algo.mini_batches={cfg.algo.mini_batches} is more than the rollouts of a step "
                        f"(learner.instances_per_step x rollout.group_size = "
                        f"{cfg.learner.instances_per_step * cfg.rollout.group_size}); lower it")
    c = cfg.cluster
    if c.num_gpus > 0:
        need_learner = cfg.learner.num_ranks
        need_engines = cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
        if c.learner_gpus not in (0, need_learner):
            problems.append(f"cluster.learner_gpus={c.learner_gpus} but learner.num_ranks={need_learner}: "
                            "one GPU per learner rank (or 0: learner ranks on the CPU); make them equal")
        if c.rollout_gpus != need_engines:
            problems.append(f"cluster.rollout_gpus={c.rollout_gpus} but rollout.num_engines x "
                            f"rollout.tensor_parallel_size = {need_engines}; make them equal")
        if c.answerer_serve and c.answerer_gpus < c.answerer_tensor_parallel:
            problems.append(f"cluster.answerer_gpus={c.answerer_gpus} < cluster.answerer_tensor_parallel="
                            f"{c.answerer_tensor_parallel}")
        total = c.learner_gpus + c.rollout_gpus + (c.answerer_gpus if c.answerer_serve else 0)
        if total > c.num_gpus:
            problems.append(f"roles ask for {total} GPUs (learner {c.learner_gpus} + rollout {c.rollout_gpus} + "
                            f"answerer {c.answerer_gpus if c.answerer_serve else 0}) but cluster.num_gpus="
                            f"{c.num_gpus}")
    for key in ("learner_resources", "rollout_resources"):
        for name, amount in _resources(getattr(c, key)).items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or amount <= 0:
                problems.append(f"cluster.{key}.{name}={amount:g}: only positive custom resources go here "
                                "(CPUs and GPUs are set by *.actor_num_cpus and cluster.*_gpus)")
    _, transport_problem = resolve_weight_transport(cfg, "cuda" if c.num_gpus > 0 else "cpu")
    if transport_problem:
        problems.append(transport_problem)
    if cluster is not None:
        problems.extend(cluster_problems(cfg, cluster))
    return problems


def _wants(req: ActorRequest) -> dict[str, float]:
    return {k: v for k, v in {"CPU": req.num_cpus, "GPU": req.num_gpus, **req.resources}.items() if v > 0}


def _fits(req: ActorRequest, node: dict[str, float]) -> bool:
    return all(amount <= node.get(name, 0.0) + 1e-9 for name, amount in _wants(req).items())


def _keys_for(req: ActorRequest, names: list[str]) -> list[str]:
    gpu_key = "rollout.tensor_parallel_size" if req.role == "engine" else f"cluster.{req.role}_gpus"
    return [req.cpu_key or "the cluster preset" if n == "CPU" else gpu_key if n == "GPU" else f"{req.resources_key}.{n}"
            for n in names]


def cluster_problems(cfg, cluster: ClusterResources) -> list[str]:
    """What the roles reserve against what the Ray cluster has (totals, then one actor per node)."""
    problems: list[str] = []
    reqs = [r for r in actor_requests(cfg) if r.count > 0]
    total = cluster.total
    gpus = total.get("GPU", 0.0)
    c = cfg.cluster
    if c.num_gpus > gpus + 1e-9:
        problems.append(f"cluster.num_gpus={c.num_gpus} but the Ray cluster has only {gpus:g} GPU(s); start Ray on "
                        f"the GPU node(s) (`ray start --num-gpus N`), use a smaller cluster preset or set "
                        f"cluster.num_gpus={gpus:g}")
    cpus = total.get("CPU", 0.0)
    need = sum(r.count * r.num_cpus for r in reqs)
    if need > cpus + 1e-9:
        parts = [f"{r.role} {r.count} x " + (f"{r.cpu_key}={r.num_cpus:g}" if r.cpu_key else f"{r.num_cpus:g}")
                 for r in reqs if r.num_cpus > 0]
        keys = ", ".join(r.cpu_key for r in reqs if r.cpu_key and r.num_cpus > 0)
        problems.append(f"the roles reserve {need:g} CPUs ({', '.join(parts)}) but the Ray cluster has {cpus:g}; "
                        f"lower {keys}, or give Ray more CPUs (cluster.num_cpus for a local Ray, "
                        "`ray start --num-cpus N` on a cluster)")
    custom: dict[str, list[ActorRequest]] = {}
    for r in reqs:
        for name in r.resources:
            custom.setdefault(name, []).append(r)
    for name, users in custom.items():
        have = total.get(name, 0.0)
        want = sum(r.count * r.resources[name] for r in users)
        keys = ", ".join(f"{r.resources_key}.{name}" for r in users)
        if have <= 0:
            problems.append(f"{keys} asks for Ray resource {name!r} but no node of the Ray cluster has it; start a "
                            f"node with `ray start --resources '{{\"{name}\": 1}}'` or drop {keys}")
        elif want > have + 1e-9:
            problems.append(f"{keys}: {want:g} of {name!r} reserved in all ({' + '.join(f'{r.count} {r.role}' for r in users)}"
                            f") but the Ray cluster has {have:g}; lower {keys} (fractions such as 0.01 are fine)")
    if not problems and cluster.nodes:
        for r in reqs:
            if not any(_fits(r, node) for node in cluster.nodes):
                wants = _wants(r)
                # the resources no node has enough of alone; if each fits somewhere, all of them together
                short = [n for n, v in wants.items() if all(node.get(n, 0.0) + 1e-9 < v for node in cluster.nodes)]
                what = ", ".join(f"{n}={v:g}" for n, v in wants.items())
                problems.append(f"one {r.role} actor needs {what} on a single node but no Ray node has that much; "
                                f"lower {' or '.join(_keys_for(r, short or list(wants)))} or add a bigger node")
    if c.answerer_serve and len(cluster.nodes) <= 1 and port_in_use(int(c.answerer_port)):
        problems.append(f"cluster.answerer_port={c.answerer_port} is already in use on this node; stop what "
                        "listens there or pick a free port (cluster.answerer_port=N)")
    return problems


def port_in_use(port: int) -> bool:
    """True when nothing may bind `port` on this machine (someone listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def resolve(cfg, cluster: ClusterResources | None = None) -> Placement:
    """The placement for `cfg`; raises ConfigError listing every problem (what to change).

    Pass `cluster` (after `ray.init`) to also check the roles' reservations against the Ray cluster."""
    problems = validate(cfg, cluster)
    if problems:
        raise ConfigError("this configuration cannot run:\n  - " + "\n  - ".join(problems))
    c = cfg.cluster
    device = "cuda" if c.num_gpus > 0 else "cpu"
    transport, _ = resolve_weight_transport(cfg, device)
    common = {"num_reward_actors": cfg.reward.num_actors, "weight_transport": transport,
              "requests": actor_requests(cfg)}
    if device == "cpu":
        return Placement(device="cpu", learner_gpus=[[] for _ in range(cfg.learner.num_ranks)],
                         engine_gpus=[[] for _ in range(cfg.rollout.num_engines)], **common)
    next_gpu = 0

    def take(n: int) -> list[int]:
        nonlocal next_gpu
        ids = list(range(next_gpu, next_gpu + n))
        next_gpu += n
        return ids

    learner = [take(1) if c.learner_gpus else [] for _ in range(cfg.learner.num_ranks)]
    engines = [take(cfg.rollout.tensor_parallel_size) for _ in range(cfg.rollout.num_engines)]
    answerer = take(c.answerer_gpus) if c.answerer_serve else []
    return Placement(device="cuda", learner_gpus=learner, engine_gpus=engines, answerer_gpus=answerer, **common)
