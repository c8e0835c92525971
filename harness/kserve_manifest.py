"""docker/kserve-inferenceservice.yaml against the Python models of KServe's API (kserve's SDK) and of
Kubernetes' (the `kubernetes` client): every key of every document must be a field of the model at
its place (V1beta1InferenceService, V1beta1PredictorSpec, V1Container, V1Probe, V1ContainerPort, ...,
recursively), every value of the field's type, and each model is built from its fields, so that its
own validation runs (required fields, allowed values). An unknown key fails: KServe's deserializer
drops one without a word, and cannot resolve the Kubernetes types anyway.

It runs in the SDK's own venv (KServe needs protobuf<7, the project pins 7), from the repository root:
    .venv/kserve-sdk/bin/python -m harness.kserve_manifest [docker/kserve-inferenceservice.yaml]
Prints the versions it checked against and one line per problem; exits 1 on any (2: no such file,
or not YAML).
tests/test_delivery.py runs it.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import version

import kserve.models
import kubernetes.client
import yaml

PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}
LIST = re.compile(r"(?:list|List)\[(.*)\]")  # KServe's models write list[...], Kubernetes' List[...]
MAPPING = re.compile(r"dict\(str, (.*)\)|Dict\[str, (.*)\]")


def model_class(name: str):
    for module in (kserve.models, kubernetes.client):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no model {name} in kserve.models or kubernetes.client")


def check(value, type_name: str, where: str, problems: list[str]):
    """`value` as `type_name` (a model's openapi_types entry); appends what is wrong to `problems`."""
    if match := LIST.fullmatch(type_name):
        if not isinstance(value, list):
            problems.append(f"{where}: not a list")
            return None
        return [check(item, match[1], f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if match := MAPPING.fullmatch(type_name):
        if not isinstance(value, dict):
            problems.append(f"{where}: not a mapping")
            return None
        return {key: check(item, match[1] or match[2], f"{where}.{key}", problems) for key, item in value.items()}
    if type_name in PRIMITIVES:
        if not isinstance(value, PRIMITIVES[type_name]) or (isinstance(value, bool) and type_name != "bool"):
            problems.append(f"{where}: {value!r} is not {type_name}")
        return value
    if type_name == "object":  # IntOrString: a port by number or by name
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            problems.append(f"{where}: {value!r} is not a number or a name")
        return value
    if type_name == "ResourceQuantity":
        if not isinstance(value, (int, str)):
            problems.append(f"{where}: {value!r} is not a quantity")
        return value
    model = model_class(type_name)
    if not isinstance(value, dict):
        problems.append(f"{where}: not a mapping ({type_name})")
        return None
    fields = {key: attribute for attribute, key in model.attribute_map.items()}
    values = {}
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{where}.{key}: no such field of {type_name}")
            continue
        values[fields[key]] = check(item, model.openapi_types[fields[key]], f"{where}.{key}", problems)
    try:
        return model(**values)
    except (ValueError, TypeError) as exc:  # the model's own validation (pydantic's errors are ValueErrors)
        problems.append(f"{where}: {type_name}: {' '.join(str(exc).split())}")
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.kserve_manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", nargs="?", default="docker/kserve-inferenceservice.yaml")
    args = parser.parse_args(argv)
    try:
        with open(args.manifest) as file:
            documents = [document for document in yaml.safe_load_all(file) if document is not None]
    except (OSError, yaml.YAMLError) as exc:  # one line, not a traceback
        print(f"error: {args.manifest}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"against kserve {version('kserve')} and kubernetes {version('kubernetes')}")
    problems: list[str] = []
    for index, document in enumerate(documents):
        metadata = document.get("metadata") if isinstance(document, dict) else None
        where = str(metadata.get("name", f"document {index}") if isinstance(metadata, dict) else f"document {index}")
        if not isinstance(document, dict) or (document.get("apiVersion"), document.get("kind")) != (
                "serving.kserve.io/v1beta1", "InferenceService"):
            problems.append(f"{where}: not a serving.kserve.io/v1beta1 InferenceService")
            continue
        check(document, "V1beta1InferenceService", where, problems)
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"{len(documents)} documents, {len(problems)} problems")
    return 1 if problems or not documents else 0


if __name__ == "__main__":
    sys.exit(main())
