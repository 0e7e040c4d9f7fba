"""The Ray executor's list scheduler (bdsafety.study.executors.schedule), without Ray: ready jobs start longest chain
first while they fit the free resources, dependencies are respected, and a shared inversion becomes a prepare node its
jobs wait for. bdsafety.study.cost prices planned jobs (benchmarks/study_budget.py prints the same estimate)."""
import pytest

from bdsafety.errors import ConfigError
from bdsafety.study.executors import Node, build_nodes, chain_ranks, schedule


def _nodes(spec: dict) -> list:
    """spec: key -> (cost, deps[, cpus[, gpus]]) in topological order."""
    nodes = [Node(k, None, list(v[1]), float(v[0]), *(float(x) for x in v[2:])) for k, v in spec.items()]
    chain_ranks(nodes)
    return nodes


def _run(nodes: list, cpus: float = 1, gpus: float = 0, finish=lambda running: running[0]) -> list:
    """Events ('start', key) / ('end', key); ``finish`` picks which running node ends next."""
    events, running = [], []

    def submit(n):
        events.append(("start", n.key))
        running.append(n.key)
        return n.key

    def wait(handles):
        assert sorted(handles) == sorted(running)
        k = finish(running)
        running.remove(k)
        return k

    schedule(nodes, {"cpus": cpus, "gpus": gpus}, submit, wait, lambda n, h: events.append(("end", n.key)))
    return events


def test_the_longest_chain_starts_first_and_dependencies_are_kept():
    # attack -> long defense (100) and short jobs; 'c' is short but heads a chain longer than 'big' alone
    nodes = _nodes({"attack": (10, []), "short1": (1, ["attack"]), "big": (100, ["attack"]), "c": (5, ["attack"]),
                    "c_next": (200, ["c"]), "short2": (1, ["attack"])})
    assert [n.rank for n in nodes] == [215, 1, 100, 205, 200, 1]
    ev = _run(nodes)
    starts = [k for e, k in ev if e == "start"]
    assert starts == ["attack", "c", "c_next", "big", "short1", "short2"]  # one CPU: by rank, deps first
    for n in nodes:  # no node starts before all its dependencies ended
        assert all(ev.index(("end", d)) < ev.index(("start", n.key)) for d in n.deps)


def test_resources_bound_what_runs_at_once_and_a_job_too_big_is_refused():
    nodes = _nodes({f"g{i}": (1, [], 1, 0.25) for i in range(4)} | {"cpu_only": (9, [], 1)})
    peak, running = 0, set()
    ev = _run(nodes, cpus=4, gpus=1)
    for e, k in ev:
        running.add(k) if e == "start" else running.discard(k)
        peak = max(peak, len(running))
    assert peak == 4 and ev[0] == ("start", "cpu_only")  # 4 CPUs: 4 at once, highest rank first
    with pytest.raises(ConfigError, match="more than the cluster has"):
        _run(_nodes({"gpu_job": (1, [], 1, 1)}), cpus=2, gpus=0)


def test_a_node_that_does_not_fit_yet_is_passed_over_for_one_that_does():
    # one GPU: 'a' holds it; 'b' (GPU, higher rank) must wait, 'c' (CPU only) starts beside 'a'
    nodes = _nodes({"a": (50, [], 1, 1), "b": (40, [], 1, 1), "c": (1, [], 1, 0)})
    ev = _run(nodes, cpus=2, gpus=1)
    assert ev[:2] == [("start", "a"), ("start", "c")]
    assert ev.index(("end", "a")) < ev.index(("start", "b"))


def test_a_shared_inversion_is_a_prepare_node_before_its_jobs(monkeypatch):
    from bdsafety.study.plan import Job

    bti = {"bti_pretrain_epochs": 50, "bti_mask_epochs": 20, "bti_gen_epochs": 30, "ratio": 0.05, "n_rounds": 3,
           "epochs": 30}
    point = {"record": "r", "attack": "badnet", "model": "cnn_tiny", "seed": 0, "pratio": 0.05, "dataset": "synthetic"}

    def job(key, kind, method, deps, config):
        return Job(key, kind, method, None, {}, deps, {"num_cpus": 1}, point, id=key, config=config)

    attack = job("r", "attack", "badnet", [], {"epochs": 30, "synthetic_n_train": 50000, "synthetic_n_test": 10000})
    pam = job("r/defense/pam", "defense", "pam", ["r"], bti)
    reinv = job("r/defense/pam_reinvert", "defense", "pam_reinvert", ["r"], {**bti, "retrain_generator": True})
    fst = job("r/defense/fst", "defense", "fst", ["r"], {"ratio": 0.02, "epochs": 10})
    monkeypatch.setattr("bdsafety.study.executors.inversion_groups", lambda todo: {"r": [pam, reinv]})
    nodes = build_nodes([attack, pam, reinv, fst])
    keys = [n.key for n in nodes]
    assert keys == ["r", "r/defense/pam (prepare)", "r/defense/pam", "r/defense/pam_reinvert", "r/defense/fst"]
    prep = nodes[1]
    assert prep.prepare and prep.deps == ["r"] and prep.job is pam
    assert all("r/defense/pam (prepare)" in n.deps for n in nodes[2:4])
    # the inversion is priced once, on the prepare node; re-inverting every round makes pam_reinvert dearer than pam
    assert prep.cost > nodes[2].cost and nodes[3].cost > nodes[2].cost > nodes[4].cost
    assert nodes[0].rank > prep.rank > nodes[3].rank


def test_a_time_budget_holds_what_would_not_end_in_time_and_fills_it_with_shorter_jobs():
    # a sitting of 50 s: the 100-s job (and the job waiting for it) is left for the next one; the short jobs run
    nodes = _nodes({"attack": (10, []), "long": (100, ["attack"]), "after_long": (1, ["long"]),
                    "s1": (5, ["attack"]), "s2": (5, ["s1"])})
    clock = [0.0]

    def finish(running):  # time advances by the cost of the node that ends
        k = running[0]
        clock[0] += next(n.cost for n in nodes if n.key == k)
        return k

    events = []

    def submit(n):
        events.append(n.key)
        running.append(n.key)
        return n.key

    def wait(handles):
        k = finish(running)
        running.remove(k)
        return k

    running: list = []
    left = schedule(nodes, {"cpus": 1, "gpus": 0}, submit, wait, lambda n, h: None, time_budget_s=50,
                    clock=lambda: clock[0])
    assert events == ["attack", "s1", "s2"] and [n.key for n in left] == ["long", "after_long"]
    running.clear()
    assert schedule(_nodes({"a": (1, [])}), {"cpus": 1}, submit, wait, lambda n, h: None, time_budget_s=0.5) != []


def test_the_local_executor_defers_every_job_past_the_budget(tmp_path):
    """A budget shorter than any job: nothing runs or is written, every job is reported deferred, and the status line
    says to run the same command again (tests/test_study.py's tiny study)."""
    from test_study import _run, _yaml

    oc, text = _run(_yaml(tmp_path / "tiny.yaml"), tmp_path / "study_tiny", time_budget_s=1.0)
    assert oc.results and {r["status"] for r in oc.results.values()} == {"deferred"}
    assert "deferred to the next sitting" in text and "run the same command again" in text
    assert not any(p.name == "attack_result.pt" for p in (tmp_path / "study_tiny").rglob("*"))


def test_the_local_executor_prices_an_inversion_on_whichever_job_will_make_it(tmp_path):
    """One job after the other, the job that makes a record's trigger inversion is the first of them that runs, which
    a time budget may make a later one: each is priced with the inversion until it is on disk, without it after."""
    from bdsafety.study.executors import local_cost
    from bdsafety.study.plan import Job

    bti = {"bti_pretrain_epochs": 50, "bti_mask_epochs": 20, "bti_gen_epochs": 30, "ratio": 0.05, "n_rounds": 3,
           "epochs": 30}
    point = {"record": "r", "attack": "badnet", "model": "cnn_tiny", "seed": 0, "pratio": 0.05}
    pam = Job("r/defense/pam", "defense", "pam", None, {}, [], {"num_cpus": 1}, point, id="p", config=bti)
    data = {"n_train": 50000, "n_test": 10000}
    cold = local_cost(pam, tmp_path, data)
    (tmp_path / "r" / "bti_inversion").mkdir(parents=True)
    (tmp_path / "r" / "bti_inversion" / "k.pt").write_bytes(b"")
    warm = local_cost(pam, tmp_path, data)
    assert cold > warm + 3000 and warm > 0


@pytest.mark.slow
def test_the_ray_executor_defers_every_job_past_the_budget(tmp_path):
    pytest.importorskip("ray")
    from test_study import _run, _yaml

    oc, text = _run(_yaml(tmp_path / "tiny.yaml"), tmp_path / "study_tiny", executor="ray", ray_num_cpus=2,
                    time_budget_s=1.0)
    assert oc.results and {r["status"] for r in oc.results.values()} == {"deferred"}
    assert "run the same command again" in text


def test_an_inversion_already_on_disk_costs_its_prepare_node_nothing(monkeypatch):
    """With the record's inversion cached (a previous sitting made it), the prepare node is priced as a job start, so a
    time budget does not defer the cheap jobs waiting for it (bdsafety.study.executors.inversion_on_disk)."""
    from bdsafety.study.plan import Job

    bti = {"bti_pretrain_epochs": 50, "bti_mask_epochs": 20, "bti_gen_epochs": 30, "ratio": 0.05, "n_rounds": 3,
           "epochs": 30}
    point = {"record": "r", "attack": "badnet", "model": "cnn_tiny", "seed": 0, "pratio": 0.05}
    pam = Job("r/defense/pam", "defense", "pam", None, {}, [], {"num_cpus": 1}, point, id="p", config=bti)
    reinv = Job("r/defense/pam_reinvert", "defense", "pam_reinvert", None, {}, [], {"num_cpus": 1}, point, id="q",
                config={**bti, "retrain_generator": True})
    monkeypatch.setattr("bdsafety.study.executors.inversion_groups", lambda todo: {"r": [pam, reinv]})
    cold = build_nodes([pam, reinv])
    warm = build_nodes([pam, reinv], inversion_ready=lambda j: True)
    assert cold[0].prepare and cold[0].cost > 600 and warm[0].cost < 10
    assert [n.cost for n in cold[1:]] == [n.cost for n in warm[1:]]


def test_one_job_makes_a_resource_shared_across_records_and_the_others_wait_for_it(tmp_path):
    """SSBA's encoder is cached per setting and shared by the seeds' attack and clean-reference jobs. Handed both at
    once, Ray trained it twice side by side (1.6 hours each); now the attack makes it, priced with it, and the clean
    reference waits for the attack, priced without it. Once it is on disk nobody waits and nobody pays for it."""
    from bdsafety.study.executors import resource_on_disk
    from bdsafety.study.plan import Job

    c = {"epochs": 30, "synthetic_n_train": 50000, "synthetic_n_test": 10000, "ssba_steps": 15625,
         "ssba_batch_size": 64}
    jobs = [Job(k, "attack", "ssba", None, {}, [], {"num_cpus": 1}, {"record": k, "role": role}, id=k, config=c)
            for k, role in (("clean-ssba_s0", "clean"), ("ssba_s0", "attack"), ("ssba_s1", "attack"))]
    cold = {n.key: n for n in build_nodes(jobs)}
    assert [n.key for n in build_nodes(jobs)][0] == "ssba_s0"  # the maker comes first, whatever the plan's order
    assert cold["clean-ssba_s0"].deps == ["ssba_s0"] and cold["ssba_s1"].deps == ["ssba_s0"]
    assert cold["ssba_s0"].cost > cold["ssba_s1"].cost + 3000 and cold["ssba_s1"].cost == cold["clean-ssba_s0"].cost
    assert cold["ssba_s0"].rank >= cold["ssba_s0"].cost + cold["ssba_s1"].cost
    on_disk = [Job(j.key, j.kind, j.method, None, {}, [], j.resources, j.point, id=j.id,
                   config={**c, "record_root": str(tmp_path)}) for j in jobs]
    assert not any(resource_on_disk(j, tmp_path) for j in on_disk)
    (tmp_path / ".cache" / "ssba").mkdir(parents=True)
    (tmp_path / ".cache" / "ssba" / "synthetic_abc.pt").write_bytes(b"")
    assert all(resource_on_disk(j, tmp_path) for j in on_disk)
    warm = build_nodes(on_disk, resource_ready=lambda j: resource_on_disk(j, tmp_path))
    assert all(n.deps == [] for n in warm) and len({n.cost for n in warm}) == 1
    assert warm[0].cost == cold["ssba_s1"].cost


def test_narcissus_surrogate_and_trigger_are_priced_once_per_setting_like_ssba_encoder():
    """Narcissus caches its surrogate (200 epochs over the POOD and the target class) and its trigger (1,000 rounds
    over the target class) per narcissus_* setting and data size, not per seed: the first seed's attack makes them,
    the others wait for it, and another data size is another cache."""
    from bdsafety.study.cost import DEFAULT_FIGURES, shared_resource
    from bdsafety.study.plan import Job

    c = {"epochs": 30, "synthetic_n_train": 50000, "synthetic_n_test": 10000, "narcissus_surrogate_epochs": 200,
         "narcissus_warmup_epochs": 5, "narcissus_gen_rounds": 1000, "narcissus_pood": "synthetic"}
    jobs = [Job(k, "attack", "narcissus", None, {}, [], {"num_cpus": 1}, {"record": k}, id=k, config=c)
            for k in ("narcissus_s0", "narcissus_s1", "narcissus_s2")]
    nodes = build_nodes(jobs)
    assert nodes[0].cost > nodes[1].cost + 3600 and nodes[1].cost == nodes[2].cost
    assert nodes[1].deps == nodes[2].deps == ["narcissus_s0"]
    key, sec = shared_resource("narcissus", c, DEFAULT_FIGURES, {"n_train": 50000})
    # 200 x (45,000 POOD + 5,000 target) + (5 + 1,000) x 5,000 images at 0.38 s per 1,000
    assert sec == pytest.approx((200 * 50000 + 1005 * 5000) * 0.38 / 1000)
    assert shared_resource("narcissus", c, DEFAULT_FIGURES, {"n_train": 2000})[0] != key
    assert shared_resource("narcissus", {**c, "narcissus_pood": "tiny"}, DEFAULT_FIGURES, {"n_train": 50000})[1] > sec
    assert shared_resource("badnet", c, DEFAULT_FIGURES, {"n_train": 50000}) is None
