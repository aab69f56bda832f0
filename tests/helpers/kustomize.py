"""``kustomize build`` for the subset deploy/ uses, in Python (CI has no kustomize binary).

Supported, with kustomize v5's semantics: ``resources`` (files and kustomization folders),
``configMapGenerator`` (``files``, with kustomize's content-hash name suffix and the
references to it rewritten), ``namespace``, ``images`` (every ``containers`` /
``initContainers`` list, whatever the kind) and ``patches`` given by ``path`` (strategic
merge, target = the patch's kind and name). Anything else in a kustomization.yaml raises,
so deploy/ cannot quietly grow a feature this renderer would get wrong. Where the real
binary is installed (``kubectl kustomize``), tests/test_deploy.py compares the two outputs.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["build", "config_map_hash", "strategic_merge", "SUPPORTED"]

SUPPORTED = {"apiVersion", "kind", "resources", "configMapGenerator", "namespace", "images", "patches"}
# patchMergeKey of the lists deploy/ patches (k8s.io/api); other lists are replaced whole.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
              "topologySpreadConstraints": "topologyKey"}


def config_map_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix (api/hasher): sha256 of Go's json.Marshal of {data, kind, name},
    its first 10 hex digits with 0 1 3 a e spelled g h k m t. The name is always "" there
    (kustomize looks up "metadata/name" as one field name and finds none), so only the
    data counts: checked against `kubectl kustomize` 5.5."""
    text = json.dumps({"data": data, "kind": "ConfigMap", "name": ""}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)               # Go escapes these for HTML safety
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def strategic_merge(target: Any, patch: Any, field: str | None = None) -> Any:
    """A strategic-merge patch: maps merge key by key (null deletes), lists named in
    MERGE_KEYS merge item by item on their key, any other value is replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        out = dict(target)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(out[key], value, key) if key in out else copy.deepcopy(value)
        return out
    if isinstance(target, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out = [copy.deepcopy(item) for item in target]
        for item in patch:
            match = [i for i, old in enumerate(out) if old.get(key) == item.get(key)]
            if match:
                out[match[0]] = strategic_merge(out[match[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _generate(folder: Path, spec: dict) -> tuple[dict, str]:
    name = spec["name"]
    unknown = set(spec) - {"name", "files"}
    if unknown:
        raise ValueError(f"{folder}: configMapGenerator {name}: unsupported fields {sorted(unknown)}")
    data = {}
    for entry in spec["files"]:
        key, _, path = entry.rpartition("=")
        data[key or Path(path).name] = (folder / path).read_text()
    hashed = f"{name}-{config_map_hash(data)}"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": hashed}, "data": data}, name


def _walk(node: Any, visit) -> None:
    if isinstance(node, dict):
        visit(node)
        for value in node.values():
            _walk(value, visit)
    elif isinstance(node, list):
        for value in node:
            _walk(value, visit)


def _rename_config_maps(doc: dict, renamed: dict[str, str]) -> None:
    """Point volumes / env references at the generated (hashed) ConfigMap names."""
    def visit(node: dict) -> None:
        for field in ("configMap", "configMapKeyRef", "configMapRef"):
            ref = node.get(field)
            if isinstance(ref, dict) and ref.get("name") in renamed:
                ref["name"] = renamed[ref["name"]]
    _walk(doc, visit)


def _split_image(image: str) -> tuple[str, str]:
    """``registry:5000/prvr:0.1`` -> (``registry:5000/prvr``, ``0.1``): the tag follows the last slash."""
    head, slash, last = image.rpartition("/")
    name, _, tag = last.partition(":")
    return head + slash + name, tag


def _set_images(doc: dict, images: list[dict]) -> None:
    def visit(node: dict) -> None:
        for field in ("containers", "initContainers"):
            for container in node.get(field) or []:
                name, tag = _split_image(container.get("image", ""))
                for rule in images:
                    if rule["name"] == name:
                        tag = rule.get("newTag", tag)
                        container["image"] = rule.get("newName", name) + (f":{tag}" if tag else "")
    _walk(doc, visit)


def _load(path: Path) -> list[dict]:
    if path.is_dir():
        return build(path)
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _patch(docs: list[dict], patch: dict, source: Path) -> None:
    kind, name = patch["kind"], patch["metadata"]["name"]
    targets = [i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(targets) != 1:
        raise ValueError(f"{source}: patch target {kind}/{name} matches {len(targets)} resources")
    docs[targets[0]] = strategic_merge(docs[targets[0]], patch)


def build(folder: str | Path) -> list[dict]:
    """The resources ``kustomize build folder`` prints (as dicts, in resource order)."""
    folder = Path(folder)
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml: fields this renderer does not implement: "
                         f"{sorted(unknown)}")
    docs = [doc for entry in spec.get("resources", []) for doc in _load(folder / entry)]
    renamed = {}
    for gen in spec.get("configMapGenerator", []):
        config_map, name = _generate(folder, gen)
        renamed[name] = config_map["metadata"]["name"]
        docs.insert(0, config_map)
    for doc in docs:
        _rename_config_maps(doc, renamed)
    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise ValueError(f"{folder}: only `patches: - path: FILE` (strategic merge) is supported")
        for patch in _load(folder / entry["path"]):
            _patch(docs, patch, folder / entry["path"])
    if spec.get("images"):
        for doc in docs:
            _set_images(doc, spec["images"])
    if spec.get("namespace"):
        for doc in docs:
            doc["metadata"]["namespace"] = spec["namespace"]
    return docs
