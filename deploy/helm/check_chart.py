"""Check the Helm chart offline: lint it, render it, validate what it renders against Kubernetes' schemas.

For the chart's default values and every values file in deploy/helm/examples/ (and any --values FILE):
  1. lint (helm_python.lint, Helm v4's linter, strict: warnings fail) against each Kubernetes version below;
  2. render (helm_python.Chart.render, what `helm template` prints; values.schema.json and the templates' `fail`
     checks apply);
  3. validate every rendered object with kubernetes-validate, strict (unknown fields fail), against the oldest
     Kubernetes version it bundles that the chart supports and the newest checked here.
Objects of CRD kinds (KEDA's ScaledObject, prometheus-operator's ServiceMonitor) have no bundled schema: they are
listed as "not schema-checked", never counted as validated. Nothing is applied to a cluster.

    .venv/bin/python deploy/helm/check_chart.py            # the table; exit status 1 on any problem
    .venv/bin/python deploy/helm/check_chart.py --values my-values.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HELM_DIR = Path(__file__).resolve().parent
CHART = HELM_DIR / "prunefusion"
EXAMPLES = HELM_DIR / "examples"
RELEASE, NAMESPACE = "prunefusion", "prunefusion"
# the chart's kubeVersion floor (Chart.yaml: >=1.25.0-0) is the oldest schema kubernetes-validate 1.37 bundles
K8S_VERSIONS = ("1.25", "1.37")
# CRD kinds: kubernetes-validate bundles only built-in kinds' schemas
NOT_SCHEMA_CHECKED = {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}


@dataclass
class Row:
    values: str
    kind: str
    name: str
    template: str
    results: dict[str, str] = field(default_factory=dict)  # k8s version -> "ok" | "not schema-checked" | error


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def values_sets(extra: list[Path] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(label, values): the defaults ({}), each file in examples/, then the extra files."""
    files = [*sorted(EXAMPLES.glob("*.yaml")), *extra]
    return [("default", {})] + [(_label(path), yaml.safe_load(path.read_text()) or {}) for path in files]


def _label(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(HELM_DIR)) if path.is_relative_to(HELM_DIR) else str(path)


def lint_problems(values: dict[str, Any], kube_version: str) -> list[str]:
    """Helm's lint findings of warning severity and above (info, e.g. "icon is recommended", is not a problem)."""
    import helm_python as helm

    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}.0")
    found = [f"{m['path']}: {m['error'].strip()}" for m in report["messages"] if m["severity"] >= 2]
    return found + [e.strip() for e in report["errors"] if not any(e.strip() in f for f in found)]


def render(values: dict[str, Any], *, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """The rendered templates (path -> text), as `helm template`; raises helm_python.HelmError on a bad value."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=name, namespace=namespace, is_install=True)


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(template, object) for every Kubernetes object rendered (NOTES.txt and empty documents left out)."""
    out = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((template.removeprefix(f"{CHART.name}/"), doc))
    return out


def render_objects(values: dict[str, Any], **kwargs) -> list[dict[str, Any]]:
    return [obj for _, obj in manifests(render(values, **kwargs))]


def validate(obj: dict[str, Any], version: str) -> str:
    """'ok', or 'not schema-checked' for a CRD kind; raises kubernetes_validate.ValidationError on a schema error."""
    import kubernetes_validate

    if (obj["apiVersion"], obj["kind"]) in NOT_SCHEMA_CHECKED:
        return "not schema-checked"
    checked = kubernetes_validate.validate(obj, version, strict=True)
    if checked != version:
        raise ValueError(f"validated against {checked}, not {version}")
    return "ok"


def check_versions_bundled() -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions

    bundled = {".".join(v.split(".")[:2]) for v in all_versions()}
    return [f"kubernetes-validate {kubernetes_validate.__version__} bundles no schema for {v}"
            for v in K8S_VERSIONS if v not in bundled]


def check(label: str, values: dict[str, Any], report: Report) -> None:
    import helm_python as helm
    import kubernetes_validate

    for version in K8S_VERSIONS:
        report.problems += [f"{label}: lint (k8s {version}): {p}" for p in lint_problems(values, version)]
    try:
        rendered = manifests(render(values))
    except helm.HelmError as err:
        report.problems.append(f"{label}: render: {err}")
        return
    seen = set()
    for template, obj in rendered:
        kind, name = obj.get("kind", "?"), obj.get("metadata", {}).get("name", "?")
        if (kind, name) in seen:
            report.problems.append(f"{label}: {kind}/{name} rendered twice")
        seen.add((kind, name))
        row = Row(label, kind, name, template)
        for version in K8S_VERSIONS:
            try:
                row.results[version] = validate(obj, version)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError, ValueError) as err:
                where = ".".join(str(p) for p in getattr(err, "path", ())) or "-"
                message = getattr(err, "message", str(err))
                row.results[version] = "INVALID"
                report.problems.append(f"{label}: {kind}/{name} (k8s {version}) at {where}: {message}")
        report.rows.append(row)


def run(extra: list[Path] = ()) -> Report:
    import helm_python as helm

    helm.enable_logging(logging.WARNING)  # the library's own INFO lines (e.g. lint's notes) stay out of the table
    report = Report(problems=check_versions_bundled())
    for label, values in values_sets(list(extra)):
        check(label, values, report)
    return report


def table(report: Report) -> str:
    headers = ["values", "kind", "name", "template", *(f"k8s {v}" for v in K8S_VERSIONS)]
    body = [[r.values, r.kind, r.name, r.template, *(r.results.get(v, "-") for v in K8S_VERSIONS)] for r in report.rows]
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *body, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
             for line in [headers, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=Path, action="append", default=[], metavar="FILE",
                        help="also check the chart with this values file (repeatable)")
    args = parser.parse_args(argv)
    report = run(args.values)
    print(table(report))
    validated = sum(1 for r in report.rows for v in r.results.values() if v == "ok")
    unchecked = sorted({r.kind for r in report.rows if "not schema-checked" in r.results.values()})
    print(f"\n{len(report.rows)} objects from {len({r.values for r in report.rows})} values sets; {validated} "
          f"object x version validations passed (strict, k8s {' and '.join(K8S_VERSIONS)}); not schema-checked "
          f"(CRD kinds, no bundled schema): {', '.join(unchecked) or 'none rendered'}. Nothing was applied to a "
          "cluster.")
    if report.problems:
        print(f"\n{len(report.problems)} problems:", file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
