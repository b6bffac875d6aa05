"""``fedseg simulate``: a whole federation on one machine, as real processes on loopback.

One SuperLink and one SuperNode per site are started on free 127.0.0.1 ports with a private
FLWR_HOME inside the run folder; the job is submitted with ``flwr run`` exactly as
``fedseg-server start`` does, and progress is read from the run directory's ``status.json`` and
``metrics.jsonl``. Everything started is stopped on exit, on an error and on Ctrl-C (process
groups, so Flower's superexec/ClientApp children go too). With no ``--data`` the built-in
synthetic multi-site demo data is generated first.

Secure aggregation (on by default) needs each site's identity key and the consortium roster:
a PKI for the simulated sites is provisioned into ``OUT/pki`` (``fedseg provision``; reused when
it already lists the same sites), every SuperNode gets node config ``identity-key`` and
``roster``, and the job's ``roster`` points at ``OUT/pki/roster.json``.

Each site's ClientApp tasks run in a long-lived site worker (``client/worker.py``). By default
every site gets its own, as at a hospital; ``sites_per_worker=N`` (``--sites-per-worker N``)
lets one worker serve N sites, so that a simulation of many sites pays for torch and MONAI once
per worker instead of once per site (~0.8 GB each).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedseg.errors import FedsegError
from fedseg.runtime.fab import write_app_dir
from fedseg.runtime.processes import (
    ManagedProcess,
    flower_env,
    flwr_cli,
    free_port,
    stop_all,
    superlink_argv,
    supernode_argv,
    wait_for_port,
    write_flwr_connection,
)
from fedseg.runtime.supernode import launcher_argv
from fedseg.server import tracking
from fedseg.server.config import JobConfig
from fedseg.server.rundir import RunDir
from fedseg.training.test_split import has_test_split

SIMULATE_OWNS = ("run_dir", "job_id", "min_sites", "roster")  # set by simulate, not by a file


def job_overrides(path: Path) -> dict:
    """The ``[job]`` table of a TOML file (or of a ``.json`` file; or the whole file), checked
    against :class:`JobConfig`; one line naming the file and field when it is wrong."""
    from pydantic import ValidationError

    from fedseg.config_io import read_toml
    from fedseg.errors import first_error

    if not path.is_file():
        raise FedsegError(f"{path}: job config file not found")
    if path.suffix != ".json":
        data = read_toml(path)
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise FedsegError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise FedsegError(f"{path}: expected a table of job settings")
    job = data.get("job", data)
    owned = [k for k in SIMULATE_OWNS if k in job]
    if owned:
        raise FedsegError(f"{path}: field '{owned[0]}' is set by fedseg simulate; remove it")
    try:
        JobConfig.model_validate({"run_dir": "check", **job})
    except ValidationError as err:
        field, msg = first_error(err)
        raise FedsegError(f"{path}: field '{field}': {msg}") from None
    return dict(job)


def find_site_dirs(data: Path) -> list[Path]:
    """``data`` itself if it holds dataset.json, else its sub-folders that do (sorted)."""
    if (data / "dataset.json").is_file():
        return [data]
    if not data.is_dir():
        raise FedsegError(f"{data}: not a folder; give a folder of site datasets")
    sites = sorted(p for p in data.iterdir() if (p / "dataset.json").is_file())
    if not sites:
        raise FedsegError(f"{data}: no site folders with a dataset.json inside")
    return sites


class Federation:
    """SuperLink + SuperNodes on loopback; a context manager that always cleans up.

    ``sites_per_worker``: how many sites one site worker serves (``client/worker.py``; only
    with ``site_workers``). 1, the default, is a hospital's set-up: a worker per site. N > 1
    groups the sites of ``site_dirs`` in order, N per worker, to save memory when many sites
    share this machine; their tasks then run one at a time per worker. A site started with its
    own ``env_extra`` (or not in ``site_dirs``) always gets a worker of its own, since the
    environment is per process."""

    def __init__(
        self, work: Path, site_dirs: list[Path], device: str = "auto", site_workers: bool = True,
        sites_per_worker: int = 1,
    ) -> None:
        if sites_per_worker < 1:
            raise FedsegError(f"sites_per_worker must be >= 1, got {sites_per_worker}")
        self.work = work
        self.site_dirs = site_dirs
        self.device = device
        self.flwr_home = work / ".flwr"
        self.env = flower_env(self.flwr_home)
        self.superlink: ManagedProcess | None = None
        self.nodes: dict[str, ManagedProcess] = {}
        # worker name -> its process: the site's name (a worker of its own) or "group<i>"
        self.workers: dict[str, ManagedProcess] = {}
        self.site_workers = site_workers
        self.sites_per_worker = sites_per_worker
        # a shared worker's sites keep their runtime API port across SuperNode restarts: the
        # worker was started with the addresses of all of them
        self.runtime_ports: dict[str, int] = {}
        # in memory: Flower 1.42 keeps every message's arrays in its state database, and an
        # SQLite file costs seconds per round at nnU-Net model sizes; a simulation resumes from
        # fedseg's own checkpoint anyway (fedseg-server chooses: superlink_database)
        self.superlink_database = ":flwr-in-memory:"
        self.port = 0
        self.pki = work / "pki"
        # the sites' node config require-secure-aggregation: False lets them answer plain rounds
        self.require_secure_aggregation = True

    def ensure_pki(self) -> Path | None:
        """Provision the demo consortium (CA, site identity keys, roster) once; returns the
        roster path (None for a federation without site folders: ``fedseg-server``)."""
        from fedseg.privacy.provision import ROSTER_FILE, load_roster, provision

        names = sorted(d.name for d in self.site_dirs)
        if not names:
            return None
        roster = self.pki / ROSTER_FILE
        if roster.is_file():
            try:
                if sorted(load_roster(roster).sites) == names:
                    return roster
            except FedsegError:
                pass
        provision(self.pki, names, consortium="fedseg-simulate", force=True)
        return roster

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_superlink(self) -> None:
        self.port = self.port or free_port()
        self.ensure_pki()
        self.superlink = ManagedProcess(
            "flower-superlink", superlink_argv(self.port, database=self.superlink_database),
            self.work / "logs" / "superlink.log", self.env, cwd=self.work,
        ).start()
        wait_for_port("127.0.0.1", self.port, 60, self.superlink)
        write_flwr_connection(self.flwr_home, "fedseg", f"127.0.0.1:{self.port}")

    def worker_group(self, name: str, env_extra: dict[str, str] | None = None) -> list[str] | None:
        """The sites that share ``name``'s worker (its group of ``sites_per_worker`` in
        ``site_dirs`` order), or None when ``name`` gets a worker of its own."""
        names = [d.name for d in self.site_dirs]
        if not self.site_workers or self.sites_per_worker <= 1 or env_extra or name not in names:
            return None
        first = names.index(name) // self.sites_per_worker * self.sites_per_worker
        return names[first:first + self.sites_per_worker]

    def _threads_env(self, env: dict[str, str]) -> dict[str, str]:
        """On CPU the sites share this machine's cores: a BLAS/OpenMP pool of cores / SITES
        each avoids thrashing. Per site, not per worker process, also when sites share a
        worker: the SuperNodes, the SuperLink and the ServerApp run beside the workers, and an
        OpenMP pool as large as the machine then waits on preempted threads (measured on 2
        cores, 2 sites in one worker: 2 threads made a 2-iteration step 10-25x slower than 1)."""
        if self.device == "cpu" or not _cuda_available():
            threads = max(1, (os.cpu_count() or 2) // max(1, len(self.site_dirs)))
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return env

    def _runtime_port(self, name: str, group: list[str] | None) -> int:
        """A fresh free port, or (shared worker) the one the site's worker already knows."""
        if group is None:
            # a group member started with env_extra: a worker of its own on a fresh port; the
            # port reserved for it in the shared worker stays in runtime_ports (unused there)
            return free_port()
        for site in group:  # the whole group's ports, before the worker starts
            if site not in self.runtime_ports:
                taken = set(self.runtime_ports.values())
                port = free_port()
                while port in taken:
                    port = free_port()
                self.runtime_ports[site] = port
        return self.runtime_ports[name]

    def start_site(
        self, data_dir: Path, name: str | None = None, env_extra: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Start (or restart: a restarted SuperNode gets a new node id) one site's SuperNode.
        ``env_extra`` reaches the site's ClientApp processes (tests use it for
        ``FEDSEG_FAULT_INJECT``, see :mod:`fedseg.client.app`); such a site gets a worker of its
        own. A site that shares a worker keeps that worker (and its runtime API port) across
        restarts; a site with its own worker gets a new one."""
        name = name or data_dir.name
        old = self.nodes.get(name)
        if old is not None:
            old.stop(timeout=5)
        cache = self.work / "sites" / name
        cache.mkdir(parents=True, exist_ok=True)
        node_cfg: dict[str, str | bool] = {
            "site": name, "data-dir": str(data_dir.resolve()), "cache-dir": str(cache.resolve()),
            "device": self.device, "require-secure-aggregation": self.require_secure_aggregation}
        key = self.pki / "sites" / name / "identity.key"
        if key.is_file():  # secure aggregation: the site's identity and the consortium roster
            node_cfg.update({"identity-key": str(key.resolve()),
                             "roster": str((self.pki / "roster.json").resolve())})
        env = self._threads_env(dict(self.env))
        env.update(env_extra or {})
        group = self.worker_group(name, env_extra)
        port = self._runtime_port(name, group)
        argv = launcher_argv(  # Flower's SuperNode, idle poll 0.5 s instead of 3 s
            supernode_argv(f"127.0.0.1:{self.port}", port, node_cfg, max_retries=None))
        old_worker = self.workers.pop(name, None)  # a worker of its own (shared: "group<i>")
        if old_worker is not None:
            old_worker.stop(timeout=5)
        if self.site_workers:  # torch/MONAI stay loaded between messages: client/worker.py
            from fedseg.client.worker import worker_argv

            argv += ["--isolation", "process"]
            if group is None:
                self.workers[name] = ManagedProcess(
                    f"worker-{name}", worker_argv(f"127.0.0.1:{port}"),
                    self.work / "logs" / f"worker-{name}.log", env, cwd=self.work,
                ).start()
            else:
                index = [d.name for d in self.site_dirs].index(group[0])
                wname = f"group{index // self.sites_per_worker}"
                shared = self.workers.get(wname)
                if shared is None or shared.poll() is not None:
                    self.workers[wname] = ManagedProcess(
                        f"worker-{wname}",
                        worker_argv([f"127.0.0.1:{self.runtime_ports[s]}" for s in group]),
                        self.work / "logs" / f"worker-{wname}.log", env, cwd=self.work,
                    ).start()
        proc = ManagedProcess(
            f"supernode-{name}", argv, self.work / "logs" / f"site-{name}.log", env, cwd=self.work,
        ).start()
        self.nodes[name] = proc
        return proc

    def submit(self, job: JobConfig, app: str | None = None) -> int:
        """``flwr run`` the job; ``app``: a registry app spec (``@fedseg/fedseg-job==x.y.z``,
        a signed bundle, see ``fedseg-server``) instead of the local app folder."""
        roster = self.ensure_pki() if job.secure_aggregation and not job.roster else None
        if roster is not None:
            job = job.model_copy(update={"roster": str(roster.resolve())})
        app_dir = write_app_dir(self.work / "app")
        job_file = Path(job.run_dir) / "job.json"
        job_file.parent.mkdir(parents=True, exist_ok=True)
        job_file.write_text(job.model_dump_json(indent=2) + "\n")
        res = flwr_cli(["run", app or str(app_dir), "fedseg", "--run-config",
                        f'job-config="{job_file.resolve()}"'], self.env)
        return int(res["run-id"])

    def run_status(self, run_id: int) -> str:
        try:
            res = flwr_cli(["ls", "fedseg", "--run-id", str(run_id)], self.env, timeout=30)
        except FedsegError:
            return "unknown"
        runs = res.get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"

    def kill_site(self, name: str) -> None:
        """SIGKILL a site's SuperNode and its ClientApp (a crashed hospital machine). A worker
        shared with other sites is left running (its task for this site fails with the
        SuperNode) and takes the site's tasks again once ``start_site`` restarts it."""
        self.nodes[name].kill()
        if name in self.workers:
            self.workers.pop(name).kill()

    def stop(self) -> None:
        """Stop every process started here, all at once; a second Ctrl-C cannot cut it short."""
        procs = [*self.nodes.values(), *self.workers.values(),
                 *([self.superlink] if self.superlink else [])]
        with _signals_ignored():
            stop_all(procs, timeout=5)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


LS_EVERY_S = 30.0


def follow(fed: Federation, run_id: int, run: RunDir, timeout: float, quiet: bool = False) -> str:
    """Print progress until the run finishes; returns Flower's final status string. With
    ``tensorboard = true`` in the run's job.json the records also go to TensorBoard event
    files as they arrive (``server/tracking.py``: here, not in the ServerApp)."""
    tb = tracking.TensorBoardLog(run.root) if tracking.wanted(run.root) else None
    try:
        return _follow(fed, run_id, run, timeout, quiet, tb)
    finally:
        if tb is not None:
            tb.close()


def _follow(fed: Federation, run_id: int, run: RunDir, timeout: float, quiet: bool,
            tb: tracking.TensorBoardLog | None) -> str:
    from fedseg.runtime.appwatch import ServerAppWatch

    deadline = time.monotonic() + timeout
    next_ls = time.monotonic() + LS_EVERY_S
    last = ""
    seen = 0
    # a killed ServerApp is a zombie that Flower still calls running: noticed in seconds
    watch = ServerAppWatch(fed.superlink.pid if fed.superlink is not None else None)
    while time.monotonic() < deadline:
        st = run.status()
        recs = run.read_metrics()
        for r in recs[seen:]:
            if tb is not None:
                tb.add(r)
            if r.get("site") == "pooled" and not quiet:
                if r.get("phase") == "eval":
                    print(f"  eval after round {r['round']}: pooled mean Dice "
                          f"{r.get('mean_dice', float('nan')):.4f}", flush=True)
                elif r.get("phase") == "train":
                    print(f"  round {r['round']}: {r.get('status')} "
                          f"sites {r.get('sites_ok')}/{r.get('sites_asked')} "
                          f"loss {r.get('loss', float('nan')):.4f} ({r.get('seconds', 0):.1f} s)"
                          + (f": {r['reason']}" if r.get("status") != "ok" and r.get("reason")
                             else ""), flush=True)
            elif r.get("status") in ("dropped", "rejected", "refused") and not quiet:
                print(f"  {r.get('phase')}: {r.get('site', r.get('node'))} {r['status']}: "
                      f"{r.get('reason', '')}", flush=True)
        seen = len(recs)
        line = f"phase {st.get('phase', '?')}, round {st.get('round', 0)}/{st.get('rounds', '?')}"
        if line != last and not quiet:
            print(line, flush=True)
            last = line
        # ``flwr ls`` is a fresh Python process (~1 CPU-second): ask it only when the run folder
        # says the job ended, or every LS_EVERY_S as a safety net, not on every poll
        now = time.monotonic()
        if st.get("state") in ("finished", "failed", "stopped") or now >= next_ls:
            status = fed.run_status(run_id)
            if status.startswith("finished"):
                return status
            next_ls = now + (2.0 if st.get("state") in ("finished", "failed") else LS_EVERY_S)
        if fed.superlink is not None and fed.superlink.poll() is not None:
            raise FedsegError(f"the SuperLink exited; see {fed.superlink.log_path}")
        why = watch.check()
        if why is not None and run.status().get("state") not in ("finished", "failed"):
            why = f"{why} ({fed.superlink.log_path if fed.superlink else 'no log'})"
            try:  # status.json must not keep saying "running"
                run.set_status(state="failed", error=why)
            except OSError:
                pass
            status = fed.run_status(run_id)
            if status.startswith("finished"):
                return status
            raise FedsegError(why)
        time.sleep(1.0)
    raise FedsegError(f"the run did not finish within {timeout:.0f} s; see {run.root}")


def simulate(
    out: Path,
    sites: int | None = 3,
    data: Path | None = None,
    rounds: int = 18,
    local_iterations: int = 50,
    preset: str = "auto",
    seed: int = 0,
    device: str = "cpu",
    timeout: float = 3600.0,
    extra: dict | None = None,
    sites_per_worker: int = 1,
    score_test: bool = True,
) -> dict:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        from fedseg.data.demo import make_demo_data

        site_dirs = make_demo_data(out / "demo-data", sites=sites, seed=seed)
    else:
        site_dirs = find_site_dirs(Path(data))
        if sites and sites > len(site_dirs):
            raise FedsegError(
                f"--sites {sites}: {data} holds only {len(site_dirs)} site folder(s) "
                f"({', '.join(d.name for d in site_dirs)}); give --sites {len(site_dirs)} or fewer"
            )
        site_dirs = site_dirs[:sites] if sites else site_dirs
    if preset == "auto":
        import torch

        preset = "nnunet" if torch.cuda.is_available() else "tiny"
    job = JobConfig(**{
        "run_dir": str(out / "run"), "job_id": f"sim-{out.name}", "min_sites": len(site_dirs),
        "rounds": rounds, "local_iterations": local_iterations, "plan_preset": preset,
        "seed": seed, "enrol_timeout_s": 300, "round_timeout_s": max(600.0, timeout / 2),
        **(extra or {}),
    })
    run = RunDir(job.run_dir)
    try:
        with Federation(out, site_dirs, device=device, sites_per_worker=sites_per_worker) as fed:
            fed.require_secure_aggregation = job.secure_aggregation  # off: sites accept plain
            interrupt_on_sigterm()
            fed.start_superlink()
            for d in site_dirs:
                fed.start_site(d)
            print(f"federation: SuperLink 127.0.0.1:{fed.port}, {len(site_dirs)} sites "
                  f"({', '.join(d.name for d in site_dirs)}); run folder {job.run_dir}", flush=True)
            run_id = fed.submit(job)
            status = follow(fed, run_id, run, timeout)
    except KeyboardInterrupt:
        # the with-block has stopped every process by now
        run.set_status(state="stopped")
        raise FedsegError("interrupted; all federation processes stopped", exit_code=130) from None
    st = run.status()
    if status != "finished:completed" or st.get("state") != "finished":
        raise FedsegError(
            f"the federated run ended '{status}': {st.get('error', 'see logs in ' + str(out / 'logs'))}"
        )
    pooled = [r for r in run.read_metrics() if r.get("phase") == "eval" and r.get("site") == "pooled"]
    summary = {"run_dir": job.run_dir, "rounds": rounds,
               "dice_by_round": {r["round"]: r["mean_dice"] for r in pooled}}
    print(json.dumps(summary, indent=2))
    tested = [d for d in site_dirs if has_test_split(d)]
    if tested and score_test:
        summary["test"] = score_test_splits(run, tested, device)
    print(report_summary(run.root, table=not (tested and score_test)), flush=True)
    return summary


def report_summary(root: Path, table: bool = True) -> str:
    """Redraw the run's report (now with the test scores, when there are any) and say where it
    is; ``table``: also the per-class, per-site final table (``fedseg-server start``, or a
    simulation whose sites have no test split: the last round's validation)."""
    from fedseg.server import report_data
    from fedseg.server.report import write_reports
    from fedseg.server.report_tables import console_summary, findings

    _, page = write_reports(root)
    data = report_data.load(root)
    if table:
        text = console_summary(data)
    else:  # the test table is printed already: only what a reader must not miss
        text = "\n".join(f"! {f}" for f in findings(data))
    head = "" if not text else "\n" + text + "\n"
    return f"{head}report: {page} (and report.md, plots.png); redraw: fedseg report {root}"


def score_test_splits(run: RunDir, sites: list[Path], device: str) -> dict:
    """The final federated model on each site's held-out test cases (imagesTs/labelsTs: never
    trained on, unlike the validation fifth the rounds report), printed as a per-site table
    and kept in ``RUN_DIR/test_scores.json``. Only a simulation can do this centrally: its
    sites are folders on this machine."""
    from fedseg.training.evaluate import json_safe
    from fedseg.training.test_split import format_table, score_sites

    print(f"scoring the final model on the test cases of {len(sites)} site(s) ...", flush=True)
    scores = score_sites(run.model_dir, sites, run.root / "test", device)
    names = {",".join(str(x) for x in (v if isinstance(v, list) else [v])): k
             for k, v in json.loads(_dataset_json(run.model_dir).read_text())["labels"].items()}
    print("\nfinal model on each site's test cases (imagesTs; Dice 1 = perfect overlap, HD95 = "
          "95th-percentile boundary distance):", flush=True)
    print(format_table(scores, names), flush=True)
    (run.root / "test_scores.json").write_text(json.dumps(json_safe(scores), indent=1) + "\n")
    return scores


def _dataset_json(model_dir: Path) -> Path:
    """The bundle's dataset.json (an ensemble's: its first member's; they all declare the same
    labels)."""
    if (model_dir / "dataset.json").is_file():
        return model_dir / "dataset.json"
    return sorted((model_dir / "members").glob("*/dataset.json"))[0]


def interrupt_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so the same cleanup runs for both."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
