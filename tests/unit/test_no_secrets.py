"""redact(): credentials never reach an MLflow param, tag or text artifact; S3 filesystems that Ray pickles carry no keys."""

from __future__ import annotations

import pytest

from codiemb.tracking.mlflow_run import MASK, flatten, is_secret_key, redact, redact_text


@pytest.mark.parametrize("key", [
    "AWS_SECRET_ACCESS_KEY", "aws_access_key_id", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "hf_token", "token", "storage.api_key", "openai-api-key", "db.password", "passwd", "client_secret",
    "GOOGLE_APPLICATION_CREDENTIALS", "Authorization", "ray.auth_token", "private_key",
])
def test_credential_like_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", [
    "model.name", "tokenizer", "max_tokens", "train.tokens_per_second", "tracking.uri", "loss.sts.pearson",
    "model.trust_remote_code", "data.datasets", "storage.endpoint_url", "author",
])
def test_ordinary_keys_are_kept(key):
    assert not is_secret_key(key)


def test_redact_masks_keys_uris_env_values_and_tokens(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-long")
    monkeypatch.setenv("HOME_DIR_NAME", "not-a-secret-value")
    out = redact({
        "AWS_SECRET_ACCESS_KEY": "anything",
        "hf_token": "hf_abcdef",
        "endpoint": "https://bob:pa55w0rd@minio.local:9000/bucket",
        "db": "postgresql://mlflow:dbpass@db:5432/mlflow",
        "note": "uploaded with wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY ok",
        "header": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
        "key_id": "AKIAIOSFODNN7EXAMPLE",
        "list": ["a", "hunter2-long"],
        "lr": 3e-5,
        "flag": True,
        "empty_token": "",
        "name": "not-a-secret-value",
        "hunter2-long": 1.0,
    })
    assert out["AWS_SECRET_ACCESS_KEY"] == MASK and out["hf_token"] == MASK
    assert out["endpoint"] == "https://***@minio.local:9000/bucket"
    assert out["db"] == "postgresql://***@db:5432/mlflow"
    assert out["note"] == "uploaded with *** ok"
    assert out["header"] == "Authorization: Bearer ***"
    assert out["key_id"] == MASK
    assert out["list"] == '["a", "***"]'
    assert out["lr"] == 3e-5 and out["flag"] is True
    assert out["empty_token"] == ""  # nothing to hide
    assert out["name"] == "not-a-secret-value"  # only credential-like variables count
    assert out[MASK] == 1.0  # a secret used as a key is scrubbed too
    text = repr(out)
    for secret in ("wJalrXUtnFEMI", "hunter2-long", "pa55w0rd", "dbpass", "hf_abcdef", "eyJhbGci", "AKIAIOSFODNN7"):
        assert secret not in text


def test_redact_text_leaves_ordinary_text_alone(monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    text = "run: {name: codiemb}\ntracking: {uri: http://127.0.0.1:5000}\nstorage: {path: s3://bucket/runs}\n"
    assert redact_text(text) == text


def test_flatten_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}, "f": None}) == \
        {"a.b": 1, "a.c.d": [1, 2], "e": {}, "f": None}


class _VanishingEnviron(dict):
    """An environment where a key listed by iteration is deleted before its value is read,
    as MLflow's telemetry thread does with _MLFLOW_TELEMETRY_SESSION_ID."""

    def __iter__(self):
        keys = list(super().__iter__())
        self.pop("GONE_TOKEN", None)
        return iter(keys)


def test_environment_snapshot_skips_keys_deleted_meanwhile():
    from codiemb.tracking.mlflow_run import environ_items

    env = _VanishingEnviron({"GONE_TOKEN": "abcdef", "HF_TOKEN": "hf_secretvalue", "PATH": "/bin"})
    assert dict(environ_items(env)) == {"HF_TOKEN": "hf_secretvalue", "PATH": "/bin"}


def test_environment_snapshot_of_the_real_environment(monkeypatch):
    from codiemb.tracking.mlflow_run import environ_items

    monkeypatch.setenv("CODIEMB_TEST_SNAPSHOT", "x1")
    assert ("CODIEMB_TEST_SNAPSHOT", "x1") in environ_items()


# --------------------------------------------------------------------------- S3 credentials and pickling
# Ray pickles the storage filesystem (RunConfig.storage_filesystem) and every datasource's filesystem
# to other processes and keeps them in its object store / GCS. A filesystem built with explicit keys
# carries them along; one built without resolves them on each worker from the standard AWS chain
# (environment, ~/.aws, web identity / IRSA, instance profile).
_AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-K7MDENG-bPxRfiCY",
            "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLESESSIONTOKEN", "AWS_DEFAULT_REGION": "us-east-1"}


def _pickled_secrets(obj) -> list[str]:
    import pickle

    blob = pickle.dumps(obj)
    return [k for k, v in _AWS_ENV.items() if k != "AWS_DEFAULT_REGION" and v.encode() in blob]


def test_pyarrow_s3_filesystem_from_the_default_chain_pickles_no_keys(monkeypatch):
    """The way codiemb should build S3 filesystems: no keys passed, so none are pickled (pyarrow's
    default credentials kind is re-resolved wherever the filesystem is unpickled)."""
    import pyarrow.fs as pafs

    for k, v in _AWS_ENV.items():
        monkeypatch.setenv(k, v)
    fs = pafs.S3FileSystem(region="us-east-1", endpoint_override="127.0.0.1:9", scheme="http")
    assert _pickled_secrets(fs) == []
    # ... while keys passed explicitly do travel with it: what the test below guards against
    explicit = pafs.S3FileSystem(access_key=_AWS_ENV["AWS_ACCESS_KEY_ID"], secret_key=_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                                 region="us-east-1")
    assert "AWS_SECRET_ACCESS_KEY" in _pickled_secrets(explicit)


@pytest.mark.parametrize("where", ["open_filesystem", "ray_trainer._storage"])
def test_s3_filesystems_that_ray_pickles_carry_no_keys(monkeypatch, where):
    for k, v in _AWS_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CODIEMB_S3_ENDPOINT", "http://127.0.0.1:9")
    if where == "open_filesystem":
        from codiemb.data.local import open_filesystem

        fs, _ = open_filesystem("s3://bucket/runs")
    else:
        from codiemb.config import config_from_dict
        from codiemb.train.ray_trainer import _storage

        cfg = config_from_dict({"storage": {"path": "s3://bucket/runs", "endpoint_url": "http://127.0.0.1:9"}})
        _, fs = _storage(cfg)
    assert fs is not None and fs.type_name == "s3"
    assert _pickled_secrets(fs) == []
