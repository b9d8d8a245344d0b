#!/usr/bin/env python3
"""Checks deploy/: the container image recipe, the entrypoint, the kustomize overlays and the alerts.

    python3 tests/deploy/deploy_test.py [--kvqd build/server/kvqd] [-v]

Needs python3 + PyYAML. Uses, when present: kubectl (>= 1.21, for `kubectl kustomize`) or
kustomize, promtool, shellcheck, mpirun, and a built kvqd with the SmolLM2 GGUF in $KVQ_CACHE
(for the SIGTERM drain through the entrypoint). A missing tool turns its check into a visible skip;
without kustomize the overlays are resolved here in Python (resources, generators, images), which
the output says.
"""
import argparse
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
RULES = K8S / "monitoring" / "kvq-alerts.rules.yaml"
DASHBOARD = K8S / "monitoring" / "kvq-dashboard.json"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
KVQD = None  # set from --kvqd

# Runtime packages of the image, by their Ubuntu 24.04 (noble) names. No Ubuntu archive is
# reachable from CI, so the names are recorded here: 24.04 renamed libraries touched by the 64-bit
# time_t transition with a "t64" suffix (Debian 12's libgrpc++1.51 is noble's libgrpc++1.51t64),
# while packages without that ABI change kept their names. Each entry: the Debian 12 package with
# the same shared library (checked with apt-cache where apt lists exist), or None for non-library
# packages that have the same name in both.
NOBLE_RUNTIME = {
    "ca-certificates": None, "tini": None, "procps": None, "openmpi-bin": None,
    "openssh-client": None, "openssh-server": None, "libgomp1": None,
    "libgrpc++1.51t64": "libgrpc++1.51", "libgrpc29t64": "libgrpc29",
    "libprotobuf32t64": "libprotobuf32", "libabsl20220623t64": "libabsl20220623",
    "libopenmpi3t64": "libopenmpi3",
    "libprometheus-cpp-core1.0": "libprometheus-cpp-core1.0",
    "libprometheus-cpp-pull1.0": "libprometheus-cpp-pull1.0",
    "libopenblas0-pthread": "libopenblas0-pthread",
}
# Build packages: the same source packages' -dev names in Debian 12 and Ubuntu 24.04.
BUILD_PACKAGES = {
    "build-essential", "cmake", "ninja-build", "pkg-config", "git", "ca-certificates",
    "libgrpc++-dev", "protobuf-compiler", "protobuf-compiler-grpc", "libprotobuf-dev", "libabsl-dev",
    "libopenmpi-dev", "openmpi-bin", "prometheus-cpp-dev", "nlohmann-json3-dev", "libopenblas-dev",
}


def load_all(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def declared_metrics():
    """Family names in server/metrics.cc, with the series names a histogram adds."""
    src = (ROOT / "server" / "metrics.cc").read_text()
    names = set()
    for kind, name in re.findall(r'Build(Counter|Gauge|Histogram)\(\)\s*\.Name\("([a-z0-9_]+)"\)', src):
        names.add(name)
        if kind == "Histogram":
            names |= {name + "_bucket", name + "_count", name + "_sum"}
    return names


def declared_flags():
    return set(re.findall(r"ABSL_FLAG\([^,]+,\s*([a-z0-9_]+),", (ROOT / "server" / "config.cc").read_text()))


def health_services():
    return set(re.findall(r'SetServingStatus\("([^"]*)"', (ROOT / "server" / "server.cc").read_text()))


def flags_file():
    out = {}
    for line in (K8S / "base" / "kvqd.flags").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.lstrip("-").partition("=")
            out[k] = v
    return out


def metric_names_in(expr):
    """kvq_* metric names in a PromQL expression (recording-rule names kvq:... are not metrics)."""
    return set(re.findall(r"\b(kvq_[a-z0-9_]+)", expr))


# ---------------------------------------------------------------------------------------------
# kustomize: the real one when available, else a resolver for the features deploy/ uses.

def kustomize_command():
    if os.environ.get("KVQ_DEPLOY_RESOLVER") == "python":  # to exercise the fallback
        return None
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True, text=True)
        try:
            minor = int(re.sub(r"\D.*", "", json.loads(out.stdout)["clientVersion"]["minor"]))
        except (ValueError, KeyError, json.JSONDecodeError):
            minor = 0
        if minor >= 21:  # older kubectl embeds kustomize v2, which lacks `labels` and `configurations`
            return ["kubectl", "kustomize"]
    return None


def python_kustomize(directory):
    """Resources (files and directories), configMapGenerator (names unhashed), images. Enough to
    check the manifests' content; not the name hashing or kustomize's own validation."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs = []
    for r in k.get("resources", []):
        p = (directory / r).resolve()
        docs += python_kustomize(p) if p.is_dir() else load_all(p)
    for g in k.get("configMapGenerator", []):
        data = {pathlib.Path(f).name: (directory / f).read_text() for f in g.get("files", [])}
        labels = (g.get("options") or {}).get("labels", {})
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": g["name"], "labels": labels}, "data": data})
    for img in k.get("images", []):
        new = img.get("newName", img["name"]) + (":" + img["newTag"] if "newTag" in img else "")
        for c in all_containers(docs):
            if c.get("image") == img["name"]:
                c["image"] = new
    return docs


def all_pod_specs(docs):
    """(owner, role, pod spec, group size) for every pod template."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, "server", d["spec"]["template"]["spec"], 1
        elif d["kind"] == "LeaderWorkerSet":
            t = d["spec"]["leaderWorkerTemplate"]
            yield d, "leader", t["leaderTemplate"]["spec"], t["size"]
            yield d, "worker", t["workerTemplate"]["spec"], t["size"]


def all_containers(docs):
    for _, _, spec, _ in all_pod_specs(docs):
        yield from spec["containers"]


RENDERED = {}
RENDER_NOTE = []


def render(overlay):
    if overlay not in RENDERED:
        cmd = kustomize_command()
        if cmd:
            r = subprocess.run(cmd + [str(overlay)], capture_output=True, text=True)
            if r.returncode != 0:
                raise AssertionError(f"{' '.join(cmd)} {overlay} failed:\n{r.stderr}")
            RENDERED[overlay] = [d for d in yaml.safe_load_all(r.stdout) if d]
            RENDER_NOTE.append(f"rendered {overlay.name} with {' '.join(cmd)}")
        else:
            RENDERED[overlay] = python_kustomize(overlay)
            RENDER_NOTE.append(f"rendered {overlay.name} with the Python resolver "
                               "(no kustomize or kubectl >= 1.21, or KVQ_DEPLOY_RESOLVER=python): names unhashed, no schema checks")
    return RENDERED[overlay]


def mpirun_np(args):
    i = args.index("-np")
    return int(args[i + 1])


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


class ManifestTest(unittest.TestCase):
    def test_every_manifest_parses(self):
        files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
        self.assertGreater(len(files), 8)
        for f in files:
            with self.subTest(file=str(f.relative_to(ROOT))):
                load_all(f)
        json.loads(DASHBOARD.read_text())

    def test_overlays_render(self):
        self.assertEqual({o.name for o in OVERLAYS}, {"single-node", "multi-node"})
        for o in OVERLAYS:
            with self.subTest(overlay=o.name):
                kinds = {d["kind"] for d in render(o)}
                self.assertTrue({"Service", "ConfigMap", "PersistentVolumeClaim", "ServiceMonitor",
                                 "PrometheusRule"} <= kinds, kinds)
                self.assertTrue(kinds & {"Deployment", "LeaderWorkerSet"}, kinds)

    def test_references_resolve(self):
        for o in OVERLAYS:
            docs = render(o)
            have = {(d["kind"], d["metadata"]["name"]) for d in docs}
            for _, role, spec, _ in all_pod_specs(docs):
                for v in spec.get("volumes", []):
                    with self.subTest(overlay=o.name, role=role, volume=v["name"]):
                        if "configMap" in v:
                            self.assertIn(("ConfigMap", v["configMap"]["name"]), have)
                        if "persistentVolumeClaim" in v:
                            self.assertIn(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]), have)
                for c in spec["containers"]:
                    self.assertNotEqual(c["image"], "kvq", "the images: transformer did not reach " + role)

    def test_ranks_match_gpus(self):
        for o in OVERLAYS:
            for owner, role, spec, size in all_pod_specs(render(o)):
                c = spec["containers"][0]
                gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
                with self.subTest(overlay=o.name, role=role):
                    self.assertEqual(int(c["resources"]["requests"]["nvidia.com/gpu"]), gpus)
                    if role == "worker":
                        self.assertEqual(c["args"], ["worker"])
                        self.assertEqual(int(env_of(c)["KVQ_GPUS_PER_POD"]), gpus)
                        continue
                    args = c["args"]
                    self.assertIn("mpirun", args)
                    self.assertEqual(args[args.index("mpirun") + 1:].count("kvqd"), 1)
                    np_ = mpirun_np(args)
                    self.assertEqual(np_, size * gpus, f"-np {np_} but {size} pod(s) x {gpus} GPUs")
                    if role == "server":
                        self.assertEqual(args[0], "run")
                        self.assertEqual(owner["spec"]["replicas"], 1)
                        self.assertIn(f"localhost:{gpus}", args, "--host localhost:N gives mpirun N slots")
                    else:
                        self.assertEqual(args[:2], ["leader", "mpirun"])
                        self.assertEqual(int(env_of(c)["KVQ_GPUS_PER_POD"]), gpus)
                        self.assertEqual(owner["spec"]["leaderWorkerTemplate"]["restartPolicy"],
                                         "RecreateGroupOnPodRestart")

    def test_probes_use_grpc_health_on_the_grpc_port(self):
        flags = flags_file()
        listen_port = int(flags["listen"].rsplit(":", 1)[1])
        services = health_services()
        for o in OVERLAYS:
            for _, role, spec, _ in all_pod_specs(render(o)):
                if role == "worker":
                    continue
                c = spec["containers"][0]
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                with self.subTest(overlay=o.name, role=role):
                    self.assertEqual(ports["grpc"], listen_port)
                    self.assertEqual(ports["metrics"], int(flags["metrics_listen"].rsplit(":", 1)[1]))
                    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                        g = c[probe]["grpc"]
                        self.assertEqual(g["port"], ports["grpc"], probe)
                        self.assertIn(g.get("service", ""), services, probe)
                    s, lv = c["startupProbe"], c["livenessProbe"]
                    self.assertGreaterEqual(s["periodSeconds"] * s["failureThreshold"], 1800,
                                            "startup must allow for loading and restoring sessions")
                    grace = spec["terminationGracePeriodSeconds"]
                    self.assertGreaterEqual(grace, float(flags["drain_grace_seconds"]) + 15)
                    self.assertGreater(lv["periodSeconds"] * lv["failureThreshold"], grace,
                                       "liveness must not restart a pod that is draining")
                    self.assertLessEqual(c["readinessProbe"]["periodSeconds"] * c["readinessProbe"]["failureThreshold"], 10)

    def test_service_exposes_grpc_and_metrics_of_rank0_only(self):
        for o in OVERLAYS:
            docs = render(o)
            svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kvqd")
            ports = {p["name"]: p for p in svc["spec"]["ports"]}
            with self.subTest(overlay=o.name):
                self.assertEqual(ports["grpc"]["appProtocol"], "grpc")
                self.assertIn("metrics", ports)
                sel = svc["spec"]["selector"]
                for owner, role, spec, _ in all_pod_specs(docs):
                    if owner["kind"] == "Deployment":
                        labels = owner["spec"]["template"]["metadata"]["labels"]
                    else:
                        labels = owner["spec"]["leaderWorkerTemplate"][role + "Template"]["metadata"]["labels"]
                    selected = all(labels.get(k) == v for k, v in sel.items())
                    self.assertEqual(selected, role != "worker", f"{role} pods selected={selected}")
                lws = [d for d in docs if d["kind"] == "LeaderWorkerSet"]
                for d in lws:  # the controller's headless Service takes the LWS's name
                    self.assertNotEqual(d["metadata"]["name"], "kvqd")
                sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
                self.assertEqual(sm["spec"]["endpoints"][0]["port"], "metrics")
                self.assertEqual(sm["spec"]["endpoints"][0]["path"], "/metrics")

    def test_gpu_shm_nccl_and_security(self):
        for o in OVERLAYS:
            for _, role, spec, _ in all_pod_specs(render(o)):
                c = spec["containers"][0]
                vols = {v["name"]: v for v in spec["volumes"]}
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                env = env_of(c)
                with self.subTest(overlay=o.name, role=role):
                    self.assertGreater(int(c["resources"]["limits"]["nvidia.com/gpu"]), 0)
                    self.assertEqual(vols[mounts["/dev/shm"]]["emptyDir"]["medium"], "Memory")
                    self.assertEqual(env.get("NCCL_NVLS_ENABLE"), "0")
                    self.assertIn("/models", mounts)
                    self.assertTrue(vols[mounts["/models"]]["persistentVolumeClaim"]["readOnly"])
                    self.assertIn("/etc/kvq", mounts)
                    if o.name == "multi-node":
                        self.assertIn("NCCL_SOCKET_IFNAME", env)
                        self.assertIn("/etc/kvq/ssh", mounts)
                    self.assertTrue(spec["securityContext"]["runAsNonRoot"])
                    self.assertNotEqual(spec["securityContext"]["runAsUser"], 0)
                    self.assertTrue(c["securityContext"]["readOnlyRootFilesystem"])
                    self.assertIn("/home/kvq", mounts, "read-only root: HOME (ssh, hostfile) needs a volume")

    def test_flags_file_names_real_flags(self):
        known = declared_flags()
        flags = flags_file()
        self.assertTrue(set(flags) <= known, set(flags) - known)
        self.assertTrue(flags["listen"].startswith("0.0.0.0:"), "must listen beyond loopback in a pod")
        self.assertTrue(flags["metrics_listen"].startswith("0.0.0.0:"))
        self.assertTrue(flags["model"].startswith("/models/") and flags["quantizer"].startswith("/models/"))


class AlertTest(unittest.TestCase):
    def rules(self):
        return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]

    def test_rules_reference_declared_metrics(self):
        declared = declared_metrics()
        used = set()
        for r in self.rules():
            used |= metric_names_in(r["expr"])
        self.assertTrue(used, "no kvq_ metric in the rules")
        self.assertEqual(used - declared, set(), "not declared in server/metrics.cc")

    def test_required_alerts_exist(self):
        names = {r.get("alert") for r in self.rules()}
        for a in ("KvqRankLost", "KvqKvCacheNearCapacity", "KvqHighErrorRate",
                  "KvqTimeToFirstTokenBudgetBurn", "KvqInterTokenLatencyBudgetBurn"):
            self.assertIn(a, names)
        readme = (DEPLOY / "README.md").read_text().lower()
        for a in filter(None, names):
            self.assertIn(f"### {a.lower()}", readme, f"deploy/README.md explains {a}")

    def test_prometheusrule_matches_rules_file(self):
        sys.path.insert(0, str(K8S / "monitoring"))
        import make_prometheusrule  # noqa: E402
        self.assertEqual((K8S / "monitoring" / "prometheusrule.yaml").read_text(), make_prometheusrule.render(),
                         "run deploy/k8s/monitoring/make_prometheusrule.py")

    def test_dashboard_references_declared_metrics(self):
        declared = declared_metrics()
        recorded = {r["record"] for r in self.rules() if "record" in r}
        exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
        self.assertGreater(len(exprs), 10)
        for e in exprs:
            self.assertEqual(metric_names_in(e) - declared, set(), e)
            self.assertEqual(set(re.findall(r"\b(kvq:[a-z0-9_:]+)", e)) - recorded, set(), e)

    def test_promtool_check_and_unit_tests(self):
        if not shutil.which("promtool"):
            self.skipTest("promtool not installed (Debian package prometheus)")
        for cmd in (["promtool", "check", "rules", str(RULES)],
                    ["promtool", "test", "rules", str(ROOT / "tests" / "deploy" / "kvq_alerts_test.yaml")]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


def dockerfile_stages():
    """[(base image, stage name, [(instruction, argument)])] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args, stages = {}, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        ins, _, rest = line.partition(" ")
        ins = ins.upper()
        if ins == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v
        elif ins == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            image = re.sub(r"\$\{(\w+)\}", lambda g: args.get(g.group(1), ""), m.group(1))
            stages.append((image, m.group(2), []))
        else:
            stages[-1][2].append((ins, rest.strip()))
    return stages


def apt_packages(run_arg):
    m = re.search(r"apt-get install (.*?)(?:&&|$)", run_arg)
    return [w for w in m.group(1).split() if not w.startswith("-")] if m else []


class DockerfileTest(unittest.TestCase):
    def test_stages_and_bases(self):
        stages = dockerfile_stages()
        self.assertEqual([s[1] for s in stages], ["build", "runtime"])
        self.assertRegex(stages[0][0], r"^nvidia/cuda:13\.0\.\d+-devel-ubuntu24\.04$")
        self.assertRegex(stages[1][0], r"^nvidia/cuda:13\.0\.\d+-runtime-ubuntu24\.04$")
        build = " ".join(a for i, a in stages[0][2] if i == "RUN")
        for target in ("kvqd", "kvqctl", "kvq"):
            self.assertRegex(build, rf"--target[^&]*\b{target}\b")
        self.assertIn("-DKVQ_BUILD_TESTS=OFF", build)

    def test_runtime_stage(self):
        ins = dockerfile_stages()[1][2]
        get = lambda name: [a for i, a in ins if i == name]
        user = get("USER")[-1].split(":")[0]
        self.assertTrue(user.isdigit() and int(user) != 0, "runtime runs as a numeric non-root USER")
        entry = json.loads(get("ENTRYPOINT")[-1])
        self.assertEqual(entry, ["/usr/bin/tini", "--", "/usr/local/bin/kvq-entrypoint"])
        cmd = json.loads(get("CMD")[-1])
        self.assertEqual(cmd[:2], ["run", "kvqd"])
        self.assertTrue(any("--flagfile=" in c for c in cmd))
        self.assertTrue(get("HEALTHCHECK"), "HEALTHCHECK for plain docker")
        runs = " ".join(get("RUN"))
        self.assertIn("kvqd --version", runs, "build-time smoke of the runtime image")
        self.assertIn('grep "not found"', runs, "every shared library resolves")
        self.assertTrue(any("NCCL_NVLS_ENABLE=0" in a for a in get("ENV")))
        copies = " ".join(get("COPY"))
        self.assertIn("--from=build", copies)
        self.assertNotIn("COPY . ", " ".join(f"{i} {a}" for i, a in ins), "no sources in the runtime image")

    def test_apt_packages_use_ubuntu_2404_names(self):
        stages = dockerfile_stages()
        build = [p for i, a in stages[0][2] if i == "RUN" for p in apt_packages(a)]
        runtime = [p for i, a in stages[1][2] if i == "RUN" for p in apt_packages(a)]
        self.assertTrue(build and runtime)
        self.assertEqual(set(build) - BUILD_PACKAGES, set())
        self.assertEqual(set(runtime) - set(NOBLE_RUNTIME), set(), "not a recorded noble runtime name")
        for p in runtime:
            self.assertFalse(p.endswith("-dev"), p)
        # The image must have every library package a kvqd built here links (by soname family).
        for need in ("libgrpc++", "libprotobuf", "libabsl", "libprometheus-cpp-pull", "libopenblas", "libopenmpi"):
            self.assertTrue(any(p.startswith(need) for p in runtime), need)
        if shutil.which("apt-cache"):
            for noble, debian in NOBLE_RUNTIME.items():
                r = subprocess.run(["apt-cache", "show", debian or noble], capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout:
                    self.skipTest("apt lists unavailable (run apt-get update) for the Debian 12 counterparts")

    def test_kvqd_version_is_the_smoke(self):
        if not KVQD or not os.access(KVQD, os.X_OK):
            self.skipTest("no kvqd built (pass --kvqd)")
        self.assertEqual(subprocess.run([KVQD, "--version"], capture_output=True).returncode, 0)
        # Why not --help: Abseil's --help exits 1, which would fail a RUN or HEALTHCHECK.
        self.assertNotEqual(subprocess.run([KVQD, "--help"], capture_output=True).returncode, 0)


class EntrypointTest(unittest.TestCase):
    def test_shell(self):
        self.assertTrue(os.access(ENTRYPOINT, os.X_OK), "entrypoint.sh must be executable")
        subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
        if shutil.which("shellcheck"):
            r = subprocess.run(["shellcheck", str(ENTRYPOINT)], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stdout)

    def test_group_hostnames_from_lws_env(self):
        out = subprocess.run(
            ["bash", "-c", f"source {shlex.quote(str(ENTRYPOINT))}; group_hosts"], capture_output=True, text=True,
            env={**os.environ, "LWS_LEADER_ADDRESS": "kvqd-group-3.kvqd-group.ml", "LWS_GROUP_SIZE": "3"})
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.split(), ["kvqd-group-3-1.kvqd-group.ml", "kvqd-group-3-2.kvqd-group.ml"])

    def test_usage(self):
        r = subprocess.run([str(ENTRYPOINT)], capture_output=True, text=True)
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage", r.stderr)


class DrainTest(unittest.TestCase):
    """SIGTERM to the entrypoint reaches rank 0's kvqd, which drains and exits 0, with and without
    mpirun (one and two CPU ranks)."""

    def model(self):
        cache = pathlib.Path(os.environ.get("KVQ_CACHE", ROOT / ".cache"))
        m = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not KVQD or not os.access(KVQD, os.X_OK):
            self.skipTest("no kvqd built (pass --kvqd)")
        if not m.exists():
            self.skipTest(f"{m} missing (scripts/setup.sh fetches it)")
        return m

    def drain(self, launcher):
        model = self.model()
        with tempfile.TemporaryDirectory() as tmp:
            port_file = pathlib.Path(tmp) / "port"
            cmd = [str(ENTRYPOINT), "run", *launcher, KVQD, f"--model={model}", "--listen=127.0.0.1:0",
                   f"--port_file={port_file}", "--metrics_listen=", "--threads=1", "--drain_grace_seconds=2"]
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
                   "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_odls_base_sigkill_timeout": "30"}
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            out = []
            try:
                deadline = time.monotonic() + 120
                for line in p.stdout:  # wait for the event: kvqd says it serves
                    out.append(line)
                    if "kvqd: serving" in line or time.monotonic() > deadline:
                        break
                self.assertTrue(any("kvqd: serving" in l for l in out), "".join(out))
                p.send_signal(signal.SIGTERM)
                rest, _ = p.communicate(timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
            log = "".join(out) + rest
            self.assertEqual(p.returncode, 0, log)
            self.assertIn("kvqd: SIGTERM: draining", log)
            self.assertIn("kvqd: drained; bye", log)
            self.assertIn("draining rank 0", log, "the entrypoint signalled kvqd, not its launcher")
            return log

    def test_drain_single_process(self):
        self.drain([])

    def test_drain_under_mpirun(self):
        if not shutil.which("mpirun"):
            self.skipTest("mpirun not installed")
        self.drain(["mpirun", "-np", "1", "--host", "localhost:1", "--bind-to", "none"])

    def test_drain_two_ranks_while_streaming(self):
        """kvqd under mpirun with 2 CPU ranks (the 634-token prompt spans both shards) receives
        SIGTERM while a stream runs: the stream completes, every rank ends, mpirun exits 0."""
        if not shutil.which("mpirun"):
            self.skipTest("mpirun not installed")
        kvqctl = pathlib.Path(KVQD).parent / "kvqctl"
        if not os.access(kvqctl, os.X_OK):
            self.skipTest("no kvqctl built beside kvqd")
        model = self.model()
        with tempfile.TemporaryDirectory() as tmp:
            port_file = pathlib.Path(tmp) / "port"
            cmd = [str(ENTRYPOINT), "run", "mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none",
                   KVQD, f"--model={model}", "--listen=127.0.0.1:0", f"--port_file={port_file}",
                   "--metrics_listen=", "--threads=1", "--drain_grace_seconds=60",
                   "--min_tokens_per_rank=64"]
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
                   "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_odls_base_sigkill_timeout": "30"}
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            out, client = [], None
            try:
                deadline = time.monotonic() + 180
                for line in p.stdout:
                    out.append(line)
                    if "kvqd: serving" in line or time.monotonic() > deadline:
                        break
                self.assertTrue(any("kvqd: serving" in l for l in out), "".join(out))
                prompt = "Summarize: " + " ".join(["The grass is green and the sky is blue."] * 60)
                client = subprocess.Popen([str(kvqctl), f"--server=127.0.0.1:{port_file.read_text().strip()}",
                                           "--max_tokens=40", "generate", prompt],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                # Signal once the stream is under way: its first output is prefill progress.
                first = client.stdout.read(6)
                self.assertTrue(first, "the stream produced no output")
                p.send_signal(signal.SIGTERM)
                streamed, _ = client.communicate(timeout=180)
                rest, _ = p.communicate(timeout=180)
            finally:
                for proc in (client, p):
                    if proc is not None and proc.poll() is None:
                        proc.kill()
            log = "".join(out) + rest
            self.assertEqual(client.returncode, 0, first + streamed)
            self.assertIn("FINISH_REASON_LENGTH", streamed)
            self.assertIn("generated 40 tokens", streamed)
            self.assertEqual(p.returncode, 0, log)
            self.assertIn("kvqd: drained; bye", log)


def main():
    global KVQD
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvqd", default=str(ROOT / "build" / "server" / "kvqd"))
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    KVQD = a.kvqd
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2 if a.verbose else 1).run(suite)
    for note in dict.fromkeys(RENDER_NOTE):
        print("deploy_test:", note)
    for test, reason in result.skipped:
        print(f"deploy_test: SKIPPED {test.id().split('.', 1)[1]}: {reason}")
    failed = len(result.failures) + len(result.errors)
    print(f"{result.testsRun - failed - len(result.skipped)} passed, {failed} failed, {len(result.skipped)} skipped")
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
