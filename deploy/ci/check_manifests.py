"""Strict offline schema check of rendered Kubernetes manifests (used by
crates/medrl/tests/deploy_manifests.rs; runnable by hand in the venv the test builds).

    python deploy/ci/check_manifests.py [--kubernetes-version 1.33.0] FILE.yaml...

Every YAML document of every FILE is checked:
- JobSet (jobset.x-k8s.io/v1alpha2): against the vendored JobSet CRD schema
  (deploy/schemas/jobset.x-k8s.io_jobsets-v0.12.0.yaml) made strict: additionalProperties: false
  on every object schema that lists properties, and the top-level metadata replaced by the strict
  ObjectMeta of kubernetes-validate. Each replicatedJob template is also checked as a batch/v1 Job
  against the strict Kubernetes schema of the minimum supported Kubernetes version, so fields that
  the CRD knows but that cluster version does not are caught too.
- every other kind: the strict schemas of kubernetes-validate (what `kubernetes-validate --strict`
  uses) for that Kubernetes version, all errors reported. A kind with no schema (a typo in
  apiVersion or kind, or a CRD we have no schema for) is an error, not a warning.

Prints one JSON object: {"FILE": ["error", ...], ...} (an empty list = valid) and exits 1 if any
file has errors, 0 otherwise.
"""

import argparse
import copy
import json
import os
import sys

import re

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils as kv_utils

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
HERE = os.path.dirname(os.path.abspath(__file__))
CRD_PATH = os.path.join(HERE, "..", "schemas", "jobset.x-k8s.io_jobsets-v0.12.0.yaml")
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def strict(node):
    """additionalProperties: false on every object schema with properties (recursively)."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def object_meta_schema(version):
    """The strict ObjectMeta schema shipped by kubernetes-validate, with its definitions inlined
    under $defs so that it can live inside another schema."""
    defs = kv_utils.schema_contents(
        "kubernetes-json-schema/v%s-local-strict/_definitions.json" % version, version
    )["$defs"]
    text = json.dumps(defs).replace("/api/_definitions.json#/$defs/", "#/$defs/")
    return json.loads(text)


def jobset_validator(kube_version):
    with open(CRD_PATH) as f:
        crd = yaml.safe_load(f)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2"]
    schema = strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    schema_version = [
        v for v in kv_utils.all_versions()
        if kv_utils.major_minor(v) <= kv_utils.major_minor(kube_version)
    ][-1]
    schema["$defs"] = object_meta_schema(schema_version)
    schema["properties"]["metadata"] = {"$ref": "#/$defs/" + OBJECT_META}
    schema["properties"]["apiVersion"]["const"] = "jobset.x-k8s.io/v1alpha2"
    schema["properties"]["kind"]["const"] = "JobSet"
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return jsonschema.Draft202012Validator(schema)


class CoreSchemas:
    """kubernetes-validate's strict schemas for one Kubernetes version, loaded once (its own
    validate() re-reads the multi-megabyte definitions file on every call)."""

    def __init__(self, kube_version):
        self.version = [
            v for v in kv_utils.all_versions()
            if kv_utils.major_minor(v) <= kv_utils.major_minor(kube_version)
        ][-1]
        self.dir = "kubernetes-json-schema/v%s-local-strict" % self.version
        definitions = kv_utils.schema_contents(self.dir + "/_definitions.json", self.version)
        self.registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
        self.validators = {}

    def validator(self, api_version, kind):
        key = (api_version, kind)
        if key not in self.validators:
            # rbac.authorization.k8s.io/v1 -> rbac-v1, as kubernetes-validate names its files.
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            try:
                schema = kv_utils.schema_contents(
                    "%s/%s-%s.json" % (self.dir, kind.lower(), group_version), self.version
                )
            except FileNotFoundError:
                schema = None
            self.validators[key] = schema and jsonschema.Draft202012Validator(
                schema, registry=referencing.Resource.from_contents(schema) @ self.registry
            )
        return self.validators[key]

    def errors(self, doc):
        """Messages, or None when there is no schema for the document's apiVersion/kind."""
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            return ["apiVersion and kind are required strings"]
        validator = self.validator(api_version, kind)
        if validator is None:
            return None
        return [
            "%s: %s" % (where(e), e.message)
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]


def where(error):
    return "$" + "".join("[%d]" % p if isinstance(p, int) else "." + str(p) for p in error.absolute_path)


def check_document(doc, core, jobset):
    if not isinstance(doc, dict):
        return ["not a mapping: %r" % (doc,)]
    name = "%s/%s" % (doc.get("kind"), (doc.get("metadata") or {}).get("name"))
    errors = []
    if doc.get("apiVersion") == "jobset.x-k8s.io/v1alpha2" and doc.get("kind") == "JobSet":
        for e in sorted(jobset.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
            errors.append("%s: JobSet schema: %s: %s" % (name, where(e), e.message))
        for i, rjob in enumerate(((doc.get("spec") or {}).get("replicatedJobs")) or []):
            template = rjob.get("template") if isinstance(rjob, dict) else None
            if not isinstance(template, dict):
                continue
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "template"}}
            job.update({k: v for k, v in template.items() if k != "metadata"})
            job["metadata"].update(template.get("metadata") or {})
            for message in core.errors(job):
                errors.append(
                    "%s: replicatedJobs[%d].template as batch/v1 Job (Kubernetes %s): %s"
                    % (name, i, core.version, message)
                )
        return errors
    messages = core.errors(doc)
    if messages is None:
        return [
            "%s: no schema for apiVersion %r kind %r in Kubernetes %s (typo, or a CRD without a schema here)"
            % (name, doc.get("apiVersion"), doc.get("kind"), core.version)
        ]
    return ["%s: Kubernetes %s strict schema: %s" % (name, core.version, m) for m in messages]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubernetes-version", default="1.33.0")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    jobset = jobset_validator(args.kubernetes_version)
    core = CoreSchemas(args.kubernetes_version)
    report = {}
    for path in args.files:
        errors = []
        try:
            with open(path) as f:
                text = f.read()
            try:  # JSON (what the Rust test writes for its mutated manifests) parses much faster
                docs = [json.loads(text)]
            except ValueError:
                docs = [d for d in yaml.load_all(text, Loader=YAML_LOADER) if d is not None]
        except (OSError, yaml.YAMLError) as e:
            docs, errors = [], ["cannot read YAML: %s" % e]
        if not docs and not errors:
            errors.append("no YAML documents")
        for doc in docs:
            errors.extend(check_document(doc, core, jobset))
        report[path] = errors
    json.dump(report, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 1 if any(report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
