"""A thin layer over the Docker Engine API (the `docker` SDK's low-level APIClient, over the
engine's socket; the CLI is never run). The verbs keep the engine's names. Blocking: callers
run it in a thread. Talking to the engine needs access to its socket (root).

Every failure is translated here: an unreachable engine is `EngineUnavailable`, a missing
image `ImageNotFound`, anything the engine refuses `RuntimeFailure` with its explanation."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any, Protocol

import docker
import docker.errors
import requests

from supervisor.errors import EngineUnavailable, ImageNotFound, RuntimeFailure

# The first API with per-container cgroup namespaces (Docker 20.10). Pinned, so the client
# never asks the engine for its version before the first real call.
API_VERSION = "1.41"
LABEL_PREFIX = "io.agent-supervisor.prefix"
LABEL_RUN = "io.agent-supervisor.run"
LABEL_AGENT = "io.agent-supervisor.agent"


class OutputStream(Protocol):
    """The SDK's CancellableStream: chunks of output; `close` ends it from another thread."""

    def __iter__(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class DockerEngine:
    def __init__(self, base_url: str, timeout: float | None) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._client: docker.APIClient | None = None

    def _api(self) -> docker.APIClient:
        if self._client is None:
            try:
                self._client = docker.APIClient(base_url=self.base_url, version=API_VERSION,
                                                timeout=self.timeout)
            except docker.errors.DockerException as exc:
                raise EngineUnavailable(f"docker engine at {self.base_url}: {exc}",
                                        engine=self.base_url) from exc
        return self._client

    def _call(self, verb: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except docker.errors.ImageNotFound as exc:
            raise ImageNotFound(f"image not found on this host: {exc.explanation}",
                                verb=verb) from exc
        except docker.errors.APIError as exc:
            raise RuntimeFailure(f"docker {verb} failed: {exc.explanation or exc}", verb=verb,
                                 status=exc.status_code,
                                 stderr=str(exc.explanation or "")) from exc
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                docker.errors.DockerException, OSError) as exc:
            raise EngineUnavailable(
                f"docker engine at {self.base_url} unreachable during {verb}: {exc}",
                engine=self.base_url, verb=verb) from exc

    # ------------------------------------------------------------------ engine

    def ping(self) -> None:
        self._call("ping", self._api().ping)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._call("info", self._api().info)
        return info

    # ------------------------------------------------------------------ images

    def inspect_image(self, ref: str) -> dict[str, Any] | None:
        try:
            image: dict[str, Any] = self._call("inspect_image", self._api().inspect_image, ref)
        except ImageNotFound:
            return None
        except RuntimeFailure as exc:
            if exc.detail.get("status") == 404:
                return None
            raise
        return image

    def import_image(self, tar: bytes, repository: str, tag: str) -> None:
        """`docker import`: a rootfs tarball becomes an image, no registry involved."""
        self._call("import_image", self._api().import_image_from_data, tar,
                   repository=repository, tag=tag)

    # ------------------------------------------------------------------ containers

    def host_config(self, **options: Any) -> dict[str, Any]:
        config: dict[str, Any] = self._api().create_host_config(**options)
        return config

    def create(self, name: str, image: str, command: list[str], **options: Any) -> str:
        created: dict[str, Any] = self._call(
            "create", self._api().create_container, image, name=name,
            entrypoint=command[:1], command=command[1:], **options)
        return str(created["Id"])

    def start(self, container: str) -> None:
        self._call("start", self._api().start, container)

    def kill(self, container: str, signal: str = "KILL") -> None:
        self._call("kill", self._api().kill, container, signal=signal)

    def stop(self, container: str, timeout: int) -> None:
        self._call("stop", self._api().stop, container, timeout=timeout)

    def pause(self, container: str) -> None:
        self._call("pause", self._api().pause, container)

    def unpause(self, container: str) -> None:
        self._call("unpause", self._api().unpause, container)

    def delete(self, container: str) -> bool:
        """`docker rm --force --volumes`; False when there was no such container."""
        try:
            self._call("delete", self._api().remove_container, container, force=True, v=True)
        except RuntimeFailure as exc:
            if exc.detail.get("status") == 404:
                return False
            raise
        return True

    def inspect(self, container: str) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = self._call("inspect", self._api().inspect_container,
                                               container)
        except RuntimeFailure as exc:
            if exc.detail.get("status") == 404:
                return None
            raise
        return state

    def wait(self, container: str, timeout: float) -> int | None:
        """The container's exit status once it has stopped; None if the engine cannot say."""
        try:
            result = self._call("wait", self._api().wait, container, timeout=timeout)
        except (RuntimeFailure, EngineUnavailable):
            return None
        code = result.get("StatusCode")
        return int(code) if code is not None else None

    def list(self, label: str) -> list[dict[str, Any]]:
        """Every container (running or not) that carries `label` ("key=value")."""
        found: list[dict[str, Any]] = self._call(
            "list", self._api().containers, all=True, filters={"label": label})
        return found

    def logs(self, container: str, since: int | None = None,
             follow: bool = True) -> OutputStream:
        """stdout and stderr, merged, as the engine's log driver kept them, followed until the
        container stops (`follow`; else what is there now): one chunk per log message, each
        prefixed with its timestamp (RFC 3339, nanoseconds) and a space. `since`: from that
        second (UNIX time, inclusive) on; None: from the container's first line."""
        stream: OutputStream = self._call(
            "logs", self._api().logs, container, stdout=True, stderr=True, stream=True,
            follow=follow, timestamps=True, **({"since": since} if since else {}))
        return stream


def tar_of(entries: dict[str, str | None], modes: dict[str, int] | None = None) -> bytes:
    """A rootfs tarball in memory: path -> symlink target, or None for an empty directory
    (mode 0755 unless `modes` says otherwise)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, target in sorted(entries.items()):
            info = tarfile.TarInfo(path)
            info.mode = (modes or {}).get(path, 0o755)
            if target is None:
                info.type = tarfile.DIRTYPE
            else:
                info.type = tarfile.SYMTYPE
                info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()
