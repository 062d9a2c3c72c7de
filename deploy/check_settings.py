"""Check that the settings deploy/ gives the daemon are ones ``orchestrator serve`` accepts.

hadolint, yamllint and kubernetes-validate check each file's own format; this
checks what they cannot see: the ``ORCHESTRATOR_*`` and ``OTEL_*`` variables
and the TOML file that the image (Dockerfile ``ENV``), compose.yaml, the
Kubernetes manifests and the systemd unit hand to ``orchestrator serve``. For
each of the four it fails when

- a variable is named ``ORCHESTRATOR_*`` but ``serve`` reads no such variable
  (the command line ignores unknown variables, so a typo would go unnoticed);
- ``ORCHESTRATOR_CONFIG`` names a file that no ConfigMap is mounted to provide;
- the log (``ORCHESTRATOR_DATABASE``) is in a directory that no volume
  (image ``VOLUME``, compose volume, Kubernetes volume, systemd
  ``StateDirectory=``) provides: the daemon makes no directory but the default
  ``./.orchestrator/``, and a log outside the volume would be lost with the
  container. ``serve --check`` reads a scratch directory in its place;
- a TLS file or the token file (:data:`SECRET_FILES`) is named, but no Secret
  (Kubernetes) or secret (compose) is mounted to provide it. Their content is
  never committed, so ``serve --check`` reads stand-ins made here instead: a
  self-signed certificate and its key, and a token (and a throwaway key for
  ``ORCHESTRATOR_SECRET_KEY``, which a Secret provides too);
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
from orchestrator.store import sqlite_path

DEPLOY = Path(__file__).resolve().parent

# Variables `serve` reads from the environment alone, not through an option (a flag's value shows in ps).
ENVIRONMENT_ONLY = {
    "ORCHESTRATOR_SECRET_KEY": "the credential sealing key (deploy/README.md, docs/security.md)",
}
_INTERPOLATION = re.compile(r"\$\{[^}]*\}")
SECRET_FILES = (
    "ORCHESTRATOR_TLS_CERT",
    "ORCHESTRATOR_TLS_KEY",
    "ORCHESTRATOR_TLS_CLIENT_CA",
    "ORCHESTRATOR_AUTH_TOKEN_FILE",
)
"""Settings naming files whose content comes from a secret at deploy time."""


def stand_ins() -> dict[str, bytes]:
    """What ``serve --check`` reads for each of :data:`SECRET_FILES`: a self-signed pair, it as the CA, a token."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "orchestrator")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    return {
        "ORCHESTRATOR_TLS_CERT": cert_pem,
        "ORCHESTRATOR_TLS_KEY": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "ORCHESTRATOR_TLS_CLIENT_CA": cert_pem,
        "ORCHESTRATOR_AUTH_TOKEN_FILE": b"stand-in-token-for-serve-check\n",
    }


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


def dockerfile_volumes(path: Path) -> set[str]:
    """The ``VOLUME`` folders of the Dockerfile (JSON or plain form)."""
    folders: set[str] = set()
    for raw in path.read_text().splitlines():
        keyword, _, rest = raw.strip().partition(" ")
        if keyword.upper() == "VOLUME":
            rest = rest.strip()
            names = yaml.safe_load(rest) if rest.startswith("[") else rest.split()
            folders.update(str(name).rstrip("/") for name in names)
    return folders


def compose_volumes(path: Path, service: str) -> set[str]:
    """The folders volumes are mounted at in one compose service."""
    document = yaml.safe_load(path.read_text())
    folders = set()
    for volume in document["services"][service].get("volumes", []):
        target = volume.split(":")[1] if isinstance(volume, str) else volume["target"]
        folders.add(target.rstrip("/"))
    return folders


def manifests(directory: Path) -> list[dict[str, Any]]:
    """The objects of the manifests in ``directory``."""
    return [d for f in sorted(directory.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def rendered(overlay: Path) -> list[dict[str, Any]] | None:
    """The objects ``kubectl kustomize overlay`` renders (None: no kubectl here; deploy/validate says so)."""
    try:
        result = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        return None
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def kubernetes_volumes(documents: list[dict[str, Any]]) -> set[str]:
    """The folders the daemon container mounts a volume other than a ConfigMap or a Secret at (the data)."""
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {
        mount["mountPath"].rstrip("/")
        for mount in pod["containers"][0].get("volumeMounts", [])
        if not {"configMap", "secret"} & set(volumes[mount["name"]])
    }


def systemd_state_directories(path: Path) -> set[str]:
    """The unit's ``StateDirectory=`` folders (under /var/lib), which systemd makes before the start."""
    folders = set()
    for line in path.read_text().splitlines():
        if line.startswith("StateDirectory="):
            folders.update(f"/var/lib/{name.split(':')[0]}" for name in line.partition("=")[2].split())
    return folders


def compose_env(path: Path, service: str) -> tuple[dict[str, str], set[str]]:
    """One compose service's environment (``${...}`` replaced by a placeholder), and the secret files it mounts."""
    document = yaml.safe_load(path.read_text())
    environment = document["services"][service].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    secrets = set()
    for secret in document["services"][service].get("secrets", []):
        source, target = (secret, secret) if isinstance(secret, str) else (secret["source"], secret.get("target"))
        target = target or source
        secrets.add(target if target.startswith("/") else f"/run/secrets/{target}")
    return {name: _INTERPOLATION.sub("placeholder", str(value)) for name, value in environment.items()}, secrets


def kubernetes_env(documents: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """The daemon container's environment, the files its ConfigMap volumes provide (by mount path), and the
    folders its Secret volumes are mounted at."""
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
    secret_folders: set[str] = set()
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            for key, text in config_maps[volume["configMap"]["name"]].items():
                files[f"{mount['mountPath'].rstrip('/')}/{key}"] = text
        if "secret" in volume:
            secret_folders.add(mount["mountPath"].rstrip("/") + "/")
    return env, files, secret_folders


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


def check(
    flavour: str, env: dict[str, str], files: dict[str, str], known: set[str], secrets: set[str], data: set[str]
) -> list[str]:
    """The problems with one flavour's settings (empty when there are none).

    ``secrets`` are the files (or, ending in ``/``, the folders) that secrets provide at deploy time;
    ``data`` the folders volumes provide.
    """
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
        database = settings.get("ORCHESTRATOR_DATABASE")
        log = sqlite_path(database) if database else None
        if log is not None and log.is_absolute():
            folder = str(log.parent)
            if folder not in data:
                problems.append(f"{flavour}: ORCHESTRATOR_DATABASE={database}, but no volume provides {folder}")
            else:
                # The volume's folder exists at deploy time: a scratch one stands in for it.
                local = Path(scratch, "data", folder.lstrip("/"))
                local.mkdir(parents=True)
                settings["ORCHESTRATOR_DATABASE"] = f"sqlite://{local / log.name}"
        content = stand_ins() if any(name in settings for name in SECRET_FILES) else {}
        for name in SECRET_FILES:
            path = settings.get(name)
            if path is None:
                continue
            if not any(path == s or (s.endswith("/") and path.startswith(s)) for s in secrets):
                problems.append(f"{flavour}: {name}={path}, but no Secret (or compose secret) is mounted there")
                continue
            local = Path(scratch, name.lower())
            local.write_bytes(content[name])
            local.chmod(0o600)
            settings[name] = str(local)
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
    """Check every flavour; print the problems and return 1 if there are any."""
    known = known_variables()
    image = dockerfile_env(DEPLOY / "Dockerfile")
    base = manifests(DEPLOY / "kubernetes")
    k8s_env, k8s_files, k8s_secrets = kubernetes_env(base)
    compose, compose_secrets = compose_env(DEPLOY / "compose.yaml", "orchestrator")
    shared, shared_secrets = compose_env(DEPLOY / "compose.postgres.yaml", "orchestrator-a")
    volumes = dockerfile_volumes(DEPLOY / "Dockerfile")
    unit = DEPLOY / "systemd/orchestrator.service"
    flavours: dict[str, tuple[dict[str, str], dict[str, str], set[str], set[str]]] = {
        "image (deploy/Dockerfile)": (image, {}, set(), volumes),
        "compose (deploy/compose.yaml)": (
            {**image, **compose},
            {},
            compose_secrets,
            volumes | compose_volumes(DEPLOY / "compose.yaml", "orchestrator"),
        ),
        "kubernetes (deploy/kubernetes)": (
            {**image, **k8s_env},
            k8s_files,
            k8s_secrets,
            volumes | kubernetes_volumes(base),
        ),
        "compose on PostgreSQL (deploy/compose.postgres.yaml)": (
            {**image, **shared},
            {},
            shared_secrets,
            volumes | compose_volumes(DEPLOY / "compose.postgres.yaml", "orchestrator-a"),
        ),
        "systemd (deploy/systemd/orchestrator.service)": (
            systemd_env(unit),
            {},
            set(),
            systemd_state_directories(unit),
        ),
    }
    overlay = rendered(DEPLOY / "kubernetes-postgres")
    if overlay is None:
        print("kubernetes on PostgreSQL (deploy/kubernetes-postgres): skipped, kubectl is not installed here")
    else:
        env, files, secrets = kubernetes_env(overlay)
        flavours["kubernetes on PostgreSQL (deploy/kubernetes-postgres)"] = (
            {**image, **env},
            files,
            secrets,
            volumes | kubernetes_volumes(overlay),
        )
    problems = [
        p
        for flavour, (env, files, secrets, data) in flavours.items()
        for p in check(flavour, env, files, known, secrets, data)
    ]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
