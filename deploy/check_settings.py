"""Check that the settings deploy/ gives the daemon are ones ``orchestrator serve`` accepts.

hadolint, yamllint and kubernetes-validate check each file's own format; this
checks what they cannot see: the ``ORCHESTRATOR_*`` and ``OTEL_*`` variables
and the TOML file that the image (Dockerfile ``ENV``), compose.yaml, the
Kubernetes manifests and the systemd unit hand to ``orchestrator serve``. For
each of the four it fails when

- a variable is named ``ORCHESTRATOR_*`` but ``serve`` reads no such variable
  (the command line ignores unknown variables, so a typo would go unnoticed);
- ``ORCHESTRATOR_CONFIG`` names a file that no ConfigMap is mounted to provide;
- ``orchestrator serve --check``, run with exactly that environment (and the
  ConfigMap's TOML file), refuses the settings or the installed plugins.

Run by deploy/validate with the project's virtualenv, where the package is installed.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from orchestrator.cli import serve

DEPLOY = Path(__file__).resolve().parent

# Variables `serve` reads from the environment alone, not through an option (a flag's value shows in ps).
ENVIRONMENT_ONLY = {
    "ORCHESTRATOR_SECRET_KEY": "the credential sealing key (deploy/README.md, docs/security.md)",
}
_INTERPOLATION = re.compile(r"\$\{[^}]*\}")


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ``ENV`` settings of the Dockerfile's last stage."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    last_from = max(i for i, line in enumerate(logical) if line.upper().startswith("FROM "))
    env: dict[str, str] = {}
    for line in logical[last_from:]:
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "ENV":
            for token in shlex.split(rest):
                name, sep, value = token.partition("=")
                if not sep:
                    raise SystemExit(f"{path}: ENV {token!r}: use the NAME=value form")
                env[name] = value
    return env


def compose_env(path: Path, service: str) -> dict[str, str]:
    """One compose service's environment, with ``${...}`` interpolations replaced by a placeholder."""
    document = yaml.safe_load(path.read_text())
    environment = document["services"][service].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    return {name: _INTERPOLATION.sub("placeholder", str(value)) for name, value in environment.items()}


def kubernetes_env(directory: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The daemon container's environment and the files its ConfigMap volumes provide, by mount path."""
    documents = [d for f in sorted(directory.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in documents if d["kind"] == "ConfigMap"}
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update({k: str(v) for k, v in config_maps[source["configMapRef"]["name"]].items()})
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else "placeholder"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            for key, text in config_maps[volume["configMap"]["name"]].items():
                files[f"{mount['mountPath'].rstrip('/')}/{key}"] = text
    return env, files


def systemd_env(path: Path) -> dict[str, str]:
    """The unit's ``Environment=`` settings."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("Environment="):
            for token in shlex.split(line.removeprefix("Environment=")):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def known_variables() -> set[str]:
    """Every variable ``orchestrator serve`` reads an option from."""
    names: set[str] = set(ENVIRONMENT_ONLY)
    for param in serve.params:
        envvar: Any = param.envvar
        names.update([envvar] if isinstance(envvar, str) else envvar or [])
    return names


def check(flavour: str, env: dict[str, str], files: dict[str, str], known: set[str]) -> list[str]:
    """The problems with one flavour's settings (empty when there are none)."""
    problems = [
        f"{flavour}: {name} is not a variable `orchestrator serve` reads"
        for name in sorted(env)
        if name.startswith("ORCHESTRATOR_") and name not in known
    ]
    settings = {k: v for k, v in env.items() if k.startswith(("ORCHESTRATOR_", "OTEL_"))}
    with tempfile.TemporaryDirectory(prefix="orchestrator-check-") as scratch:
        config = settings.get("ORCHESTRATOR_CONFIG")
        if config is not None:
            if config not in files:
                return [*problems, f"{flavour}: ORCHESTRATOR_CONFIG={config}, but no ConfigMap is mounted there"]
            local = Path(scratch, "config.toml")
            local.write_text(files[config])
            settings["ORCHESTRATOR_CONFIG"] = str(local)
        if "placeholder" in settings.get("ORCHESTRATOR_SECRET_KEY", ""):
            # The key comes from a Secret (or the operator's shell), never from these files: a throwaway stands in.
            settings["ORCHESTRATOR_SECRET_KEY"] = base64.b64encode(os.urandom(32)).decode()
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", "serve", "--check"],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": scratch, "LANG": "C.UTF-8", **settings},
            cwd=scratch,
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip().replace("\n", "\n    ")
        problems.append(f"{flavour}: `orchestrator serve --check` refused its settings:\n    {output}")
    else:
        first = result.stdout.splitlines()[0] if result.stdout else ""
        print(f"{flavour}: {len(settings)} setting(s); serve --check: {first}")
    return problems


def main() -> int:
    """Check the four flavours; print the problems and return 1 if there are any."""
    known = known_variables()
    image = dockerfile_env(DEPLOY / "Dockerfile")
    k8s_env, k8s_files = kubernetes_env(DEPLOY / "kubernetes")
    flavours = {
        "image (deploy/Dockerfile)": (image, {}),
        "compose (deploy/compose.yaml)": ({**image, **compose_env(DEPLOY / "compose.yaml", "orchestrator")}, {}),
        "kubernetes (deploy/kubernetes)": ({**image, **k8s_env}, k8s_files),
        "systemd (deploy/systemd/orchestrator.service)": (systemd_env(DEPLOY / "systemd/orchestrator.service"), {}),
    }
    problems = [p for flavour, (env, files) in flavours.items() for p in check(flavour, env, files, known)]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
