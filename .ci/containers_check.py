"""The built images, run for real with podman the way deploy/kubernetes/base/deployment.yaml runs them.

    python .ci/containers_check.py --repo MODELS [--cpu-image IMAGE] [--cuda-image IMAGE]

.ci/containers builds the images and trains MODELS, then calls this. Each check prints one line; the first
that fails ends the run with a non-zero exit and the container's log.

CPU image, one container with the Deployment's args, limits and security context (read-only root
filesystem with a memory-backed /tmp, all capabilities dropped, no privilege escalation, the runtime's
default seccomp profile, the image's own user) and the repository mounted read-only at /mnt/models:
  - every package in the image is at its constraints.txt version; no torch, matplotlib, tqdm or pip;
  - every process runs as UID/GID 10001 with no capabilities, no_new_privs and a seccomp filter, on a
    read-only root; gRPC health turns SERVING;
  - tritonclient's answers on real MNIST test digits equal those of mnist-serve on this machine for the
    same model; /metrics counts exactly the requests sent;
  - `podman stop` with the pod's termination grace period ends it with exit code 0, well within it.
Three containers on 127.0.0.1, .2 and .3 behind one `ipv4:` target of the project's MnistClient: one is
killed (SIGKILL) under load; the client's calls go on and the other two answer them. Prints what the client
saw (calls by status) and what each server counted.
CUDA image (no GPU needed): `mnist-serve --help`, onnxruntime lists CUDAExecutionProvider, the CUDA and
cuDNN libraries of the nvidia-* wheels load (onnxruntime.preload_dlls) and satisfy the CUDA provider's
library, and `--device cuda` without a GPU ends with one clear error line.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import MnistClient
from serving.mnist import load_mnist

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml"
CONSTRAINTS = ROOT / "constraints.txt"
MODEL = "mnist"
RUN_ID = f"{os.getpid()}"
LABEL = f"mnist-serving.check={RUN_ID}"
NOT_IN_A_SERVING_IMAGE = {"torch", "matplotlib", "tqdm", "onnx", "onnxscript", "pip"}
DIGITS = 2000  # real MNIST test digits compared between the container and the host server
BATCH = 50  # images per KServe request
KILL_LOAD_S = (3.0, 5.0)  # load before and after one replica is killed


class CheckFailed(Exception):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)
    print(f"  ok  {message}", flush=True)


def podman(*args: str, timeout: float = 120, ok: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"podman {' '.join(args[:3])} ... did not finish within {timeout:g} s") from None
    if ok and done.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])} ... exited {done.returncode}: {done.stderr.strip()}")
    return done


# ------------------------------------------------------------------------------------ the pod, as podman


def pod_flags(repo: Path) -> tuple[list[str], list[str], int]:
    """(podman run flags, container args, grace seconds) for the Deployment's pod. The flags are fixed
    translations of the security context below: a manifest that no longer sets it fails here."""
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "mnist-serve")
    security = container["securityContext"]
    expected = {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    for key, value in expected.items():
        if security.get(key) != value:
            raise CheckFailed(f"{DEPLOYMENT.name}: securityContext.{key} is {security.get(key)}, not {value}")
    pod_security = pod["securityContext"]
    seccomp = pod_security.get("seccompProfile", {}).get("type")
    if not pod_security.get("runAsNonRoot") or seccomp != "RuntimeDefault":
        raise CheckFailed(f"{DEPLOYMENT.name}: the pod must set runAsNonRoot and seccomp RuntimeDefault")
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"]
    tmp_size = tmp["sizeLimit"].replace("Mi", "m")
    limits = container["resources"]["limits"]
    flags = [
        "--read-only", "--read-only-tmpfs=false", f"--tmpfs=/tmp:rw,size={tmp_size},mode=1777",
        "--cap-drop=all", "--security-opt=no-new-privileges",  # seccomp: podman's default profile
        f"--cpus={limits['cpu']}", f"--memory={limits['memory'].replace('Gi', 'g')}",
        f"--volume={repo}:/mnt/models:ro", f"--label={LABEL}",
    ]  # fmt: skip
    return flags, container["args"], pod.get("terminationGracePeriodSeconds", 30)


def start(image: str, name: str, flags: list[str], args: list[str], ports: dict[int, str]) -> None:
    published = [f"--publish={address}:{inner}" for inner, address in ports.items()]
    podman("run", "--detach", f"--name={name}", *flags, *published, image, *args)


def free_port(hosts: tuple[str, ...] = ("127.0.0.1",)) -> int:
    """A port free on every one of hosts."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise CheckFailed(f"no port free on all of {hosts}")


def wait_serving(target: str, what: str, timeout: float = 120) -> float:
    started = time.monotonic()
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - started < timeout:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise CheckFailed(f"{what} at {target} did not report gRPC health SERVING within {timeout:g} s")


def in_image(image: str, *command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A command in a fresh container of image, with the pod's restrictions but no model volume."""
    flags = ["--rm", "--read-only", "--cap-drop=all", "--security-opt=no-new-privileges", f"--label={LABEL}"]
    return podman("run", *flags, "--entrypoint", command[0], image, *command[1:], timeout=timeout, ok=False)


PACKAGES = "import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"  # noqa: E501


def check_packages(image: str) -> None:
    done = in_image(image, "python", "-c", PACKAGES)
    check(done.returncode == 0, f"python runs in {image}")
    installed = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in json.loads(done.stdout).items()}
    locked = dict(
        line.split("==") for line in CONSTRAINTS.read_text().splitlines() if "==" in line and line[0] != "#"
    )
    unlocked = {k: v for k, v in installed.items() if k != "mnist-serving" and locked.get(k) != v}
    check(
        not unlocked, f"{len(installed) - 1} packages, each at its constraints.txt version {unlocked or ''}"
    )
    unwanted = sorted(NOT_IN_A_SERVING_IMAGE & set(installed))
    check(not unwanted, f"none of {', '.join(sorted(NOT_IN_A_SERVING_IMAGE))} {unwanted or ''}")


# ------------------------------------------------------------------------------------- what runs inside


def container_processes(name: str) -> list[int]:
    out = podman("top", name, "hpid").stdout.split()
    return [int(p) for p in out[1:]]


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}


def mount_options(pid: int) -> dict[str, str]:
    """Mount point -> options of the process's mount namespace (the last mount wins)."""
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        mounts[fields[4]] = fields[5]
    return mounts


def check_confinement(name: str) -> None:
    pids = container_processes(name)
    check(len(pids) >= 1, f"{len(pids)} processes in the container")
    for pid in pids:
        status = proc_status(pid)
        uids, gids = set(status["Uid"].split()), set(status["Gid"].split())
        check(uids == {"10001"} and gids == {"10001"}, f"pid {pid} ({status['Name']}) runs as UID/GID 10001")
        check(
            int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0,
            f"pid {pid}: no capabilities (effective, permitted, bounding)",
        )
        confined = status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        check(confined, f"pid {pid}: no_new_privs, seccomp filter")
    mounts = mount_options(pids[0])
    check(mounts["/"].split(",")[0] == "ro", "root filesystem read-only")
    check(mounts["/mnt/models"].split(",")[0] == "ro", "/mnt/models read-only")
    check(mounts["/tmp"].split(",")[0] == "rw", "/tmp writable (tmpfs, as the pod's emptyDir)")


def kserve_probabilities(target: str, images: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(target)
    try:
        parts = []
        for i in range(0, len(images), BATCH):
            batch = np.ascontiguousarray(images[i : i + BATCH, None])
            request = triton.InferInput("images", list(batch.shape), "UINT8")
            request.set_data_from_numpy(batch)
            result = client.infer(MODEL, [request], outputs=[triton.InferRequestedOutput("probabilities")])
            parts.append(result.as_numpy("probabilities"))
        return np.concatenate(parts)
    finally:
        client.close()


def scrape(url: str) -> float:
    """The requests /metrics counts as answered OK for the model."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("mnist_requests_total{") and f'model="{MODEL}"' in line and 'status="OK"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def stop(name: str, grace: int) -> None:
    started = time.monotonic()
    done = podman("stop", f"--time={grace}", name, timeout=grace + 30, ok=False)
    seconds = time.monotonic() - started
    code = podman("inspect", "--format={{.State.ExitCode}}", name).stdout.strip()
    check(
        done.returncode == 0 and code == "0" and seconds < grace,
        f"podman stop --time={grace} {name}: exit code {code} after {seconds:.1f} s",
    )


# ---------------------------------------------------------------------------------------------- checks


def check_pod(image: str, repo: Path, host_target: str, digits: np.ndarray, labels: np.ndarray) -> None:
    flags, args, grace = pod_flags(repo)
    name = f"mnist-check-{RUN_ID}-pod"
    port, metrics_port = free_port(), free_port()
    print(f"== {image} as the Deployment's pod: {' '.join(flags[:-2])} {' '.join(args)}", flush=True)
    start(image, name, flags, args, {8001: f"127.0.0.1:{port}", 8002: f"127.0.0.1:{metrics_port}"})
    try:
        seconds = wait_serving(f"127.0.0.1:{port}", name)
        print(f"  ok  gRPC health SERVING after {seconds:.1f} s")
        check_confinement(name)
        ours = kserve_probabilities(f"127.0.0.1:{port}", digits)
        host = kserve_probabilities(host_target, digits)
        same = np.array_equal(ours.argmax(1), host.argmax(1))
        diff = float(np.abs(ours - host).max())
        accuracy = float((ours.argmax(1) == labels).mean())
        check(
            same and diff <= 1e-6,
            f"tritonclient: {len(digits)} test digits, same classes as the host server, max |Δp| {diff:.1e}, "
            f"accuracy {accuracy:.2%}",
        )
        counted = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        sent = -(-len(digits) // BATCH)
        check(counted == sent, f"/metrics counts {counted:g} requests answered OK, {sent} sent")
        stop(name, grace)
        logs = podman("logs", name)
        log = logs.stdout + logs.stderr
        noise = [line for line in log.splitlines() if "Traceback" in line or "W:onnxruntime" in line]
        check(
            not noise,
            f"the server's log: {len(log.splitlines())} lines, no traceback or ORT warning {noise[:3] or ''}",
        )
    except BaseException:
        print(podman("logs", "--tail=40", name, ok=False).stderr[-4000:], file=sys.stderr)
        raise


def check_replicas(image: str, repo: Path, digits: np.ndarray) -> None:
    flags, args, grace = pod_flags(repo)
    hosts = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    port, metrics_port = free_port(hosts), free_port(hosts)
    names = [f"mnist-check-{RUN_ID}-r{i + 1}" for i in range(len(hosts))]
    print(f"== three replicas on {', '.join(hosts)} port {port}, one killed under load", flush=True)
    for name, host in zip(names, hosts, strict=True):
        ports = {8001: f"{host}:{port}", 8002: f"{host}:{metrics_port}"}
        start(image, name, flags, [*args, "--workers=1"], ports)
    try:
        for name, host in zip(names, hosts, strict=True):
            wait_serving(f"{host}:{port}", name)
        metrics = [f"http://{host}:{metrics_port}/metrics" for host in hosts]
        target = "ipv4:" + ",".join(f"{host}:{port}" for host in hosts)
        outcomes: Counter[str] = Counter()
        after_kill: Counter[str] = Counter()
        counting = threading.Lock()
        killed = threading.Event()
        deadline = time.monotonic() + sum(KILL_LOAD_S)

        def load(client: MnistClient, offset: int) -> None:
            i = offset
            while time.monotonic() < deadline:
                images = digits[i % len(digits) : i % len(digits) + 8]
                try:
                    client.classify(list(images), top_k=1)
                    outcome = "OK"
                except grpc.RpcError as e:
                    outcome = e.code().name
                with counting:
                    outcomes[outcome] += 1
                    if killed.is_set():
                        after_kill[outcome] += 1
                i += 8

        with MnistClient(target, model=MODEL, timeout=10) as client:
            threads = [threading.Thread(target=load, args=(client, k * 997)) for k in range(4)]
            for t in threads:
                t.start()
            time.sleep(KILL_LOAD_S[0])
            before = [scrape(url) for url in metrics]
            podman("kill", "--signal=KILL", names[1])
            killed.set()
            for t in threads:
                t.join()
        after = [scrape(url) if i != 1 else None for i, url in enumerate(metrics)]
        print(f"  client ({target}, MnistClient): {sum(outcomes.values())} calls, {dict(outcomes)}; "
              f"after the kill {dict(after_kill)}")  # fmt: skip
        for host, answered, later in zip(hosts, before, after, strict=True):
            since = "it was killed" if later is None else f"the kill, {later - answered:g} after"
            print(f"  server {host}: answered {answered:g} before {since}")
        counted = sum(before) + sum(a - b for a, b in zip(after, before, strict=True) if a is not None)
        print(
            f"  the servers counted {counted:g} answers for the client's {outcomes['OK']} OK calls "
            "(the killed one's count is from its last scrape, just before SIGKILL)"
        )
        check(all(b > 0 for b in before), "round robin reached every replica before the kill")
        check(set(outcomes) == {"OK"}, "every call answered OK while a replica was killed")
        check(
            after_kill["OK"] > 0 and all(after[i] > before[i] for i in (0, 2)),
            "the two remaining replicas answered the calls after the kill",
        )
        for i in (0, 2):
            stop(names[i], grace)
    except BaseException:
        for name in names:
            print(f"--- {name}", podman("logs", "--tail=20", name, ok=False).stderr[-2000:], file=sys.stderr)
        raise


def check_cpu_image(image: str, repo: Path) -> None:
    print(f"== {image}", flush=True)
    check_packages(image)
    mnist = load_mnist()
    digits, labels = mnist.test_images[:DIGITS], mnist.test_labels[:DIGITS]
    port = free_port()
    mnist_serve = Path(sys.executable).with_name("mnist-serve")  # this environment's, on this machine
    host = subprocess.Popen(
        [mnist_serve, "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port), "--metrics-port=-1",
         "--http-port=0", "--workers=1", "--log-level=WARNING"],
    )  # fmt: skip
    try:
        wait_serving(f"127.0.0.1:{port}", "mnist-serve on this machine")
        check_pod(image, repo, f"127.0.0.1:{port}", digits, labels)
    finally:
        host.terminate()
        host.wait(timeout=30)
    check_replicas(image, repo, digits)


# In the CUDA image: the providers; what preload_dlls loads from the nvidia-* wheels (it prints "Failed to
# load" for a library it needs and cannot load); which libraries the CUDA provider still lacks with those
# directories on the search path. Only the driver's libcuda.so.1 should be missing: on a GPU node the NVIDIA
# container runtime mounts it.
CUDA_LIBRARIES = """
import os, subprocess, onnxruntime as ort
print(",".join(ort.get_available_providers()))
ort.preload_dlls()
loaded = sorted({line.split()[-1] for line in open("/proc/self/maps") if "/nvidia/" in line})
print(" ".join(os.path.basename(path) for path in loaded))
provider = os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime_providers_cuda.so")
path = ":".join(sorted({os.path.dirname(p) for p in loaded}))
ldd = subprocess.run(["ldd", provider], capture_output=True, text=True, env={"LD_LIBRARY_PATH": path})
print(" ".join(line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line) or "-")
"""
CUDA_NEEDS = {"libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9"}


def check_cuda_image(image: str, repo: Path) -> None:
    print(f"== {image} (no GPU here)", flush=True)
    check_packages(image)
    done = podman("run", "--rm", "--read-only", f"--label={LABEL}", image, "--help", ok=False)
    check(done.returncode == 0 and "usage: mnist-serve" in done.stdout, "mnist-serve --help")
    done = in_image(image, "python", "-c", CUDA_LIBRARIES)
    failed = done.returncode != 0 or "Failed to load" in done.stdout
    check(not failed, f"onnxruntime.preload_dlls() ran{': ' + done.stdout + done.stderr if failed else ''}")
    providers, loaded, missing = done.stdout.strip().splitlines()[-3:]
    has_cuda = "CUDAExecutionProvider" in providers.split(",")
    check(has_cuda, f"onnxruntime.get_available_providers(): {providers}")
    check(
        set(loaded.split()) >= CUDA_NEEDS,
        f"onnxruntime.preload_dlls() loads from the nvidia-* wheels: {loaded}",
    )
    check(missing == "libcuda.so.1", f"the CUDA provider lacks only the driver's library: {missing}")
    flags, args, _ = pod_flags(repo)
    done = podman("run", "--rm", *flags, image, *args, "--device=cuda", timeout=120, ok=False)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    check(
        done.returncode != 0 and "Traceback" not in done.stderr and "cuda" in last.lower(),
        f"--device cuda without a GPU: exit {done.returncode}, {last!r}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a trained model repository")
    parser.add_argument("--cpu-image", help="check the CPU image")
    parser.add_argument("--cuda-image", help="check the CUDA image")
    a = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("containers_check: terminated"))  # clean up below
    repo = a.repo.resolve()
    try:
        if a.cpu_image:
            check_cpu_image(a.cpu_image, repo)
        if a.cuda_image:
            check_cuda_image(a.cuda_image, repo)
    except CheckFailed as e:
        sys.exit(f"containers_check: FAILED: {e}")
    finally:
        leftover = podman("ps", "--all", "--quiet", f"--filter=label={LABEL}", ok=False).stdout.split()
        if leftover:
            podman("rm", "--force", "--time=0", *leftover, ok=False)


if __name__ == "__main__":
    main()
