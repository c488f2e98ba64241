"""Gateway protection end to end: API keys scoped to models, JWT (HS256, RS256), rate limits."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.gateway_support import GatewayProcess, Replica, build_replica_repository, infer_body, sha256

X = np.ones((1, 4), dtype=np.float32)
HS_SECRET = "hs256-secret-for-tests-0123456789abcdef"
AUDIENCE = "inferstack-gateway"


def _rsa() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes | str]:
    private, public = _rsa()
    other_private, _ = _rsa()
    return {"private": private, "public": public, "other_private": other_private}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, keys: dict) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("gateway_auth")
    replica = Replica(build_replica_repository(workdir / "repo"), log_path=workdir / "replica.log")
    (workdir / "rs256.pem").write_text(keys["public"])
    config = {
        "replicas": {"static": [replica.spec]},
        "auth": {
            "api_keys": [
                {"name": "all", "sha256": sha256("key-all"), "models": ["*"]},
                {"name": "only-a", "sha256": sha256("key-a"), "models": ["model_a"]},
                {"name": "slow", "sha256": sha256("key-slow"), "rps": 0.2, "burst": 2},
            ],
            "jwt": {"hs256_secret": HS_SECRET, "rs256_public_key_file": "rs256.pem", "audience": AUDIENCE},
        },
        "rate_limits": {"per_model": {"model_b": {"rps": 0.2, "burst": 3}}},
        "limits": {"max_request_bytes": 100_000},
    }
    try:
        process = GatewayProcess(config, workdir)
    except BaseException:
        replica.stop()
        raise
    process.replica = replica  # type: ignore[attr-defined]
    process.workdir = workdir  # type: ignore[attr-defined]
    try:
        process.wait("/v2/models/model_a/ready", headers={"x-api-key": "key-all"})
        yield process
    finally:
        process.stop()
        replica.stop()


def _infer(gateway: GatewayProcess, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v2/models/{model}/infer", content=infer_body(X), headers=headers, timeout=30)


def _token(key: object, algorithm: str, **claims: object) -> str:
    body = {"sub": "tester", "aud": AUDIENCE, "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, key, algorithm=algorithm)


def test_api_keys(gateway: GatewayProcess) -> None:
    assert httpx.get(gateway.url + "/v2/health/ready").status_code == 200  # probes need no credential
    missing = _infer(gateway, "model_a")
    assert missing.status_code == 401 and "credentials" in missing.json()["error"]
    assert _infer(gateway, "model_a", {"x-api-key": "wrong"}).status_code == 401
    assert _infer(gateway, "model_a", {"Authorization": "Basic abc"}).status_code == 401
    assert _infer(gateway, "model_a", {"Authorization": "Bearer key-all"}).status_code == 200
    assert _infer(gateway, "model_a", {"x-api-key": "key-a"}).status_code == 200
    scoped = _infer(gateway, "model_b", {"x-api-key": "key-a"})
    assert scoped.status_code == 403 and "model_b" in scoped.json()["error"]
    assert httpx.get(gateway.url + "/v2/models/model_b", headers={"x-api-key": "key-a"}).status_code == 403
    index = httpx.post(gateway.url + "/v2/repository/index", headers={"x-api-key": "key-a"}).json()
    assert {row["name"] for row in index} == {"model_a"}
    assert gateway.metric("inferstack_gateway_auth_failures_total", code="403") >= 2


def test_jwt_hs256_and_rs256(gateway: GatewayProcess, keys: dict) -> None:
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    assert _infer(gateway, "model_a", bearer(_token(HS_SECRET, "HS256"))).status_code == 200
    assert _infer(gateway, "model_a", bearer(_token(keys["private"], "RS256"))).status_code == 200
    expired = _infer(gateway, "model_a", bearer(_token(HS_SECRET, "HS256", exp=int(time.time()) - 60)))
    assert expired.status_code == 401 and "expired" in expired.json()["error"]
    wrong_aud = _infer(gateway, "model_a", bearer(_token(HS_SECRET, "HS256", aud="someone-else")))
    assert wrong_aud.status_code == 401 and "audience" in wrong_aud.json()["error"]
    forged = _infer(gateway, "model_a", bearer(_token(keys["other_private"], "RS256")))
    assert forged.status_code == 401
    wrong_secret = _infer(gateway, "model_a", bearer(_token("not-the-secret-0123456789abcdef-xyz", "HS256")))
    assert wrong_secret.status_code == 401
    no_exp = jwt.encode({"sub": "x", "aud": AUDIENCE}, HS_SECRET, algorithm="HS256")
    assert _infer(gateway, "model_a", bearer(no_exp)).status_code == 401
    scoped = bearer(_token(keys["private"], "RS256", models=["model_a"]))
    assert _infer(gateway, "model_a", scoped).status_code == 200
    assert _infer(gateway, "model_b", scoped).status_code == 403


def test_grpc_auth(gateway: GatewayProcess) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(gateway.grpc_url)
    inputs = [grpcclient.InferInput("INPUT0", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(X)
    with pytest.raises(InferenceServerException) as info:
        client.infer("model_a", inputs)
    assert "UNAUTHENTICATED" in str(info.value.status())
    with pytest.raises(InferenceServerException) as info:
        client.infer("model_b", inputs, headers={"x-api-key": "key-a"})
    assert "PERMISSION_DENIED" in str(info.value.status())
    result = client.infer("model_a", inputs, headers={"authorization": "Bearer key-all"})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), X + 10)
    client.close()


def test_rate_limits_per_key_and_per_model(gateway: GatewayProcess) -> None:
    statuses = [_infer(gateway, "model_a", {"x-api-key": "key-slow"}) for _ in range(4)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]
    limited = statuses[-1]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "key:slow" in limited.json()["error"]
    # model_b: 3 tokens for everyone together, whatever the key.
    codes = [_infer(gateway, "model_b", {"x-api-key": "key-all"}).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[-1] == 429
    assert gateway.metric("inferstack_gateway_rate_limited_total", model="model_b", scope="model") >= 1
    assert gateway.metric("inferstack_gateway_rate_limited_total", model="model_a", scope="key") >= 1


def test_request_size_limit(gateway: GatewayProcess) -> None:
    big = b'{"inputs": []}' + b" " * 200_000
    response = httpx.post(gateway.url + "/v2/models/model_a/infer", content=big, headers={"x-api-key": "key-all"})
    assert response.status_code == 413 and "100000" in response.json()["error"]


def test_tls_termination(gateway: GatewayProcess) -> None:
    import datetime
    import ipaddress
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    workdir = gateway.workdir  # type: ignore[attr-defined]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (workdir / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (workdir / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
    config = {"replicas": {"static": [gateway.replica.spec]},  # type: ignore[attr-defined]
              "tls": {"cert": "tls.crt", "key": "tls.key"}}
    tls = GatewayProcess(config, workdir, name="tls", wait_ready=False)
    try:
        https = tls.url.replace("http://", "https://")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(https + "/v2/models/model_a/ready", verify=False, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert tls.process.poll() is None, tls.log()
            time.sleep(0.1)
        response = httpx.post(https + "/v2/models/model_a/infer", content=infer_body(X),
                              verify=ssl.create_default_context(cafile=str(workdir / "tls.crt")), timeout=30)
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on the TLS port
            httpx.get(tls.url + "/v2/health/live", timeout=5)
    finally:
        tls.stop()
