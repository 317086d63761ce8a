"""The cluster recipes in infra/ are well-formed and only run commands the `actstore` CLI accepts.

Static checks (no cluster, no Docker): every YAML parses; KubeRay objects have the right API group, a CPU head
and a GPU worker group; embedded extraction configs validate as `ExtractConfig`; Ray versions agree between the
Dockerfile and the manifests; and every `actstore ...` command line found in entrypoints, container commands,
shell commands, the Dockerfile, the SLURM script and the README parses with `actstore.cli.build_parser()`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from actstore.cli import build_parser
from actstore.schemas.config import ExtractConfig

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
REQUIRED = ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml", "ray-cluster-launcher.yaml", "dask-kubernetes.yaml",
            "dask-slurm.py", "Dockerfile", "extract-example.yaml", "README.md"]
YAML_FILES = sorted(p for p in INFRA.iterdir() if p.suffix in (".yaml", ".yml"))
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _objects(kind: str | None = None, group: str | None = None) -> list[tuple[str, dict]]:
    out = []
    for path in YAML_FILES:
        for doc in _docs(path):
            if isinstance(doc, dict) and "kind" in doc and (kind is None or doc["kind"] == kind) \
                    and (group is None or str(doc.get("apiVersion", "")).startswith(group)):
                out.append((path.name, doc))
    return out


COMMAND_KEY = re.compile(r"(entrypoint|command|commands|script|args)$", re.IGNORECASE)


def _command_strings(node: Any, under_command: bool = False) -> Iterator[str]:
    """Shell strings under command-like keys (RayJob entrypoint, launcher *_commands, ...). Container
    command/args lists are argv vectors, not shell, and are read by `_container_command` instead."""
    if isinstance(node, str):
        if under_command:
            yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            if k in ("command", "args") and isinstance(v, list):
                continue
            yield from _command_strings(v, under_command or bool(COMMAND_KEY.search(str(k))))
    elif isinstance(node, list):
        for v in node:
            yield from _command_strings(v, under_command)


def _containers(node: Any) -> Iterator[dict]:
    """Every Kubernetes container spec anywhere in a manifest."""
    if isinstance(node, dict):
        for key, v in node.items():
            if key in ("containers", "initContainers") and isinstance(v, list):
                yield from (c for c in v if isinstance(c, dict))
            else:
                yield from _containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _containers(v)


# ---- finding `actstore ...` command lines ------------------------------------------------------------------------
def _is_actstore(token: str) -> bool:
    return token == "actstore" or token.endswith("/actstore")


def _shell_commands(text: str) -> list[list[str]]:
    """`actstore` invocations in shell text: at the start of a command, or after `--` (ray job submit ... -- CMD)."""
    found = []
    for line in _logical_lines(text):
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError:  # unbalanced quotes in prose; a real command would be caught by its other checks
            continue
        segment: list[str] = []
        for tok in tokens + [";"]:
            if tok in SEPARATORS:
                found.extend(_in_segment(segment))
                segment = []
            else:
                segment.append(tok)
    return found


def _in_segment(tokens: list[str]) -> list[list[str]]:
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # leading VAR=value assignments
    for i, tok in enumerate(tokens):
        if _is_actstore(tok) and (i == 0 or tokens[i - 1] in ("--", "exec")):
            return [["actstore", *tokens[i + 1:]]]
    return []


def _logical_lines(text: str) -> Iterator[str]:
    """Lines with comment/prompt/list markers removed and backslash continuations joined."""
    pending = ""
    for raw in text.splitlines():
        line = re.sub(r"^\s*(#+\s*)?(\$\s+|-\s+|\+\s+)?", "", raw).rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def _container_command(c: dict) -> list[str] | None:
    cmd = [str(x) for x in (c.get("command") or []) + (c.get("args") or [])]
    if cmd and _is_actstore(cmd[0]):
        return ["actstore", *cmd[1:]]
    if not c.get("command") and "actstore" in str(c.get("image", "")) and c.get("args"):
        return ["actstore", *[str(x) for x in c["args"]]]  # the image's ENTRYPOINT is actstore
    return None


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _slurm_module():
    spec = importlib.util.spec_from_file_location("actstore_infra_dask_slurm", INFRA / "dask-slurm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _markdown_code(text: str) -> str:
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL))


def collect_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every actstore invocation in infra/."""
    cmds: list[tuple[str, list[str]]] = []
    for path in YAML_FILES:
        text = path.read_text(encoding="utf-8")
        cmds += [(f"{path.name} (text)", c) for c in _shell_commands(text)]
        for doc in _docs(path):
            for s in _command_strings(doc):
                cmds += [(f"{path.name} (value)", c) for c in _shell_commands(s)]
            for c in _containers(doc):
                if (argv := _container_command(c)) is not None:
                    cmds.append((f"{path.name} (container {c.get('name')})", argv))
    entry = cmd = None
    for op, rest in _dockerfile_instructions():
        if op == "RUN":
            cmds += [("Dockerfile RUN", c) for c in _shell_commands(rest)]
        elif op == "ENTRYPOINT":
            entry = json.loads(rest)
        elif op == "CMD":
            cmd = json.loads(rest)
    if entry:
        cmds.append(("Dockerfile ENTRYPOINT+CMD", [*entry, *(cmd or [])]))
    slurm = _slurm_module()
    cmds += [("dask-slurm.py", c) for c in slurm.actstore_commands("s3://b/run", "blocks.6.hook_resid_post",
                                                                  "tcp://10.0.0.1:8786", "/shared/results")]
    cmds += [("dask-slurm.py (docstring)", c) for c in _shell_commands(slurm.__doc__ or "")]
    cmds += [("README.md", c) for c in _shell_commands(_markdown_code((INFRA / "README.md").read_text()))]
    unique: dict[str, tuple[str, list[str]]] = {}
    for where, argv in cmds:
        unique.setdefault(shlex.join(argv), (where, argv))
    return list(unique.values())


COMMANDS = collect_commands()


# ---- tests -------------------------------------------------------------------------------------------------------
def test_required_files_exist():
    missing = [f for f in REQUIRED if not (INFRA / f).is_file()]
    assert not missing, f"missing from infra/: {missing}"


def test_readme_explains_every_file():
    readme = (INFRA / "README.md").read_text(encoding="utf-8")
    unexplained = [p.name for p in INFRA.iterdir() if p.is_file() and p.name != "README.md" and p.name not in readme]
    assert not unexplained, f"infra/README.md does not mention {unexplained}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path: Path):
    docs = _docs(path)
    assert docs, f"{path.name} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs), f"{path.name}: every document must be a mapping"
    for d in docs:
        if "kind" in d:
            assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{path.name}: {d['kind']} lacks apiVersion/name"


KUBERAY = _objects(group="ray.io/")


def _ray_cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def test_kuberay_objects_present():
    kinds = {(name, obj["kind"]) for name, obj in KUBERAY}
    assert ("kuberay-rayjob.yaml", "RayJob") in kinds and ("kuberay-raycluster.yaml", "RayCluster") in kinds
    assert all(obj["apiVersion"] == "ray.io/v1" for _, obj in KUBERAY)


@pytest.mark.parametrize("name,obj", KUBERAY, ids=[f"{n}:{o['kind']}" for n, o in KUBERAY])
def test_kuberay_cpu_head_and_gpu_workers(name: str, obj: dict):
    spec = _ray_cluster_spec(obj)
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert head and all(_gpus(c) == 0 for c in head), f"{name}: the head should be a CPU pod"
    groups = spec["workerGroupSpecs"]
    gpu_groups = [g for g in groups if any(_gpus(c) >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{name}: no worker group requests nvidia.com/gpu"
    for g in gpu_groups:
        for c in g["template"]["spec"]["containers"]:
            req = c["resources"].get("requests", {}).get("nvidia.com/gpu")
            assert req is None or int(req) == _gpus(c), f"{name}: GPU requests must equal limits"
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], name
    assert str(spec["rayVersion"]) == _docker_arg("RAY_VERSION"), f"{name}: rayVersion differs from the image's Ray"


def test_raycluster_autoscales():
    (_, cluster), = [(n, o) for n, o in KUBERAY if o["kind"] == "RayCluster"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    g = cluster["spec"]["workerGroupSpecs"][0]
    assert g["maxReplicas"] > g["minReplicas"] >= 0


def _secret_refs(container: dict) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    return refs


def test_rayjob_runs_extract_from_configmap():
    (_, job), = [(n, o) for n, o in KUBERAY if o["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["actstore", "extract"], job["spec"]["entrypoint"]
    config_path = Path(argv[2])
    spec = _ray_cluster_spec(job)
    pod = spec["headGroupSpec"]["template"]["spec"]
    mount = next(m for c in pod["containers"] for m in c.get("volumeMounts", [])
                 if config_path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm_name = volume["configMap"]["name"]
    (_, cm), = [(n, o) for n, o in _objects("ConfigMap") if o["metadata"]["name"] == cm_name]
    text = cm["data"][config_path.relative_to(mount["mountPath"]).as_posix()]
    cfg = ExtractConfig.build(yaml.safe_load(text))
    assert cfg.executor == "ray" and "://" in cfg.output, "a cluster job needs shared (s3://) output"
    # S3 credentials come from a Secret on the head (driver) and on the GPU workers (shard writers)
    workers = [c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"] if _gpus(c)]
    for c in pod["containers"] + workers:
        assert _secret_refs(c), f"container {c['name']} gets no credentials from a Secret"


def test_example_configs_validate():
    cfg = ExtractConfig.build(INFRA / "extract-example.yaml")
    assert cfg.executor == "ray"


def test_ray_launcher():
    (cfg,) = _docs(INFRA / "ray-cluster-launcher.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    gpu_types = [v for v in workers.values() if re.match(r"(g|p)\d", v["node_config"]["InstanceType"])]
    assert gpu_types, "no GPU worker node type"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
    setup = " ".join(cfg["setup_commands"])
    assert re.search(r"pip install [^;&|]*\"actstore\[s3\]\"", setup), setup
    assert f"ray[default]=={_docker_arg('RAY_VERSION')}" in setup, "nodes must run the image's Ray version"
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "--head" in starts and "$RAY_HEAD_IP" in starts


def test_dask_kubernetes():
    clusters = _objects("DaskCluster", "kubernetes.dask.org/v1")
    assert len(clusters) == 1
    _, dc = clusters[0]
    name = dc["metadata"]["name"]
    sched = dc["spec"]["scheduler"]
    assert any(p["port"] == 8786 for p in sched["service"]["ports"])
    worker_args = [c.get("command", []) + c.get("args", []) for c in dc["spec"]["worker"]["spec"]["containers"]]
    assert all(a[:2] == ["dask", "worker"] for a in worker_args), worker_args
    jobs = [argv for where, argv in COMMANDS if where.startswith("dask-kubernetes.yaml (container")]
    assert {tuple(a[1:2]) for a in jobs} >= {("spectra",), ("train",)}, jobs
    for argv in jobs:
        address = argv[argv.index("--scheduler") + 1]
        assert address == f"tcp://{name}-scheduler:8786", f"{argv} does not reach the operator's scheduler Service"


def test_dask_slurm_script():
    mod = _slurm_module()
    args = mod.parse_args(["--store", "s3://b/r", "--hook", "blocks.0.hook_resid_post", "--gpus-per-job", "1"])
    kw = mod.cluster_kwargs(args)
    assert kw["job_extra_directives"] == ["--gres=gpu:1"] and kw["processes"] == 1
    assert all("--scheduler" in c for c in mod.actstore_commands("s3://b/r", "h", "tcp://x:1"))


def _docker_arg(name: str) -> str | None:
    for op, rest in _dockerfile_instructions():
        if op == "ARG" and rest.split("=", 1)[0] == name:
            return rest.split("=", 1)[1].strip("\"'") if "=" in rest else ""
    return None


def test_dockerfile():
    ins = _dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    entry = [json.loads(rest) for op, rest in ins if op == "ENTRYPOINT"]
    assert entry == [["actstore"]], f"ENTRYPOINT must be the actstore CLI, got {entry}"
    assert _docker_arg("TORCH_SPEC") is not None, "no ARG TORCH_SPEC"
    runs = [rest for op, rest in ins if op == "RUN"]
    assert any(re.search(r"pip install .*\$\{?TORCH_SPEC\}?", r) for r in runs), "TORCH_SPEC is never installed"
    assert any("wget" in r for r in runs), "KubeRay's probes need wget in the image"
    copied = " ".join(rest for op, rest in ins if op == "COPY")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", "README.md"}
    missing = [d for d in needed if not re.search(rf"(^|\s){re.escape(d)}/?(\s|$)", copied)]
    assert not missing, f"the image does not copy {missing}"


def test_commands_found():
    wheres = {where.split(" ")[0] for where, _ in COMMANDS}
    assert {"kuberay-rayjob.yaml", "dask-kubernetes.yaml", "Dockerfile", "dask-slurm.py", "README.md"} <= wheres
    verbs = {argv[1] for _, argv in COMMANDS if len(argv) > 1}
    assert {"extract", "spectra", "train"} <= verbs, verbs


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[f"{w}: {shlex.join(a)}" for w, a in COMMANDS])
def test_command_parses(where: str, argv: list[str]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv[1:])
    except SystemExit as e:
        if e.code not in (0, None):  # --help / --version exit 0
            pytest.fail(f"{where}: `{shlex.join(argv)}` is not a valid actstore command: "
                        f"{err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else e}")
        return
    if args.command == "extract":  # `--set` overrides must name config keys and give valid values
        bad = [kv for kv in args.set if kv.partition("=")[0] not in ExtractConfig.model_fields]
        assert not bad, f"{where}: `{shlex.join(argv)}` overrides unknown config keys {bad}"
        if Path(args.config).name == "extract-example.yaml":
            ExtractConfig.build(INFRA / "extract-example.yaml", args.set)
