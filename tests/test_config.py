"""Server config: typed, strict, errors name the field."""

import pytest

from prunefusion.home import expand_path
from prunefusion.server.config import ConfigError, load_config, parse_config


def test_embedded_default_serves_the_default_lm_its_pruned_variant_and_transfusion():
    from prunefusion.models.builds import job_file, packaged_jobs

    config = load_config()
    assert config.server.port == 50051
    assert [m.name for m in config.models] == ["tiny-lm", "tiny-lm-pruned", "transfusion"]
    assert [m.build for m in config.models] == ["default", "tiny-lm-angular-25", "transfusion"]
    assert [m.engine for m in config.models] == ["torch", "torch", "transfusion"]
    assert config.models[0].resolved_path.parts[-2:] == ("models", "tiny-lm")
    assert config.models[1].resolved_path.parts[-2:] == ("models", "tiny-lm-pruned")
    assert job_file("tiny-lm-angular-25") == packaged_jobs()["tiny-lm-angular-25"]


def test_build_names_a_recipe_or_a_compression_job(tmp_path):
    model = {"name": "m", "path": str(tmp_path / "m")}
    with pytest.raises(ConfigError, match="unknown build 'nope'"):
        parse_config({"models": [{**model, "build": "nope"}]})
    job = tmp_path / "my-job.yaml"
    job.write_text("name: my-job\nmodel: x\nprune: {n: 1}\n")
    assert parse_config({"models": [{**model, "build": str(job)}]}).models[0].build == str(job)
    assert parse_config({"models": [{**model, "build": "transfusion-pico"}]}).models[0].build == "transfusion-pico"


def test_prunefusion_home_expands(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEFUSION_HOME", str(tmp_path))
    config = load_config()
    assert config.models[0].resolved_path == tmp_path / "models" / "tiny-lm"
    assert expand_path(config.cache.data_dir) == tmp_path / "cache" / "redis"


def test_default_cache_is_embedded_and_on():
    cache = load_config().cache
    assert cache.enabled and cache.url is None


@pytest.mark.parametrize(("data", "named"), [
    ({"models": [{"name": "a", "path": "/x", "max_batch": 4}]}, "models[0].max_batch"),
    ({"models": [{"name": "a", "path": "/x", "max_batch_size": 0}]}, "models[0].max_batch_size"),
    ({"models": [{"name": "a", "path": "/x", "engine": "tensorrt"}]}, "models[0].engine"),
    ({"models": [{"name": "a", "path": "/x", "build": "huge"}]}, "models[0].build"),
    ({"models": [{"name": "a b", "path": "/x"}]}, "models[0].name"),
    ({"models": [{"name": "a"}]}, "models[0].path"),
    ({"models": []}, "models"),
    ({"server": {"prot": 1}, "models": [{"name": "a", "path": "/x"}]}, "server.prot"),
    ({"cache": {"ttl": 5}, "models": [{"name": "a", "path": "/x"}]}, "cache.ttl"),
    ({"cache": {"ttl_jitter": 2}, "models": [{"name": "a", "path": "/x"}]}, "cache.ttl_jitter"),
    ({"cache": {"timeout_ms": 0}, "models": [{"name": "a", "path": "/x"}]}, "cache.timeout_ms"),
    ({"models": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}, "repeated"),
    ({"models": [{"name": "a", "path": "/x", "default_max_new_tokens": 99, "max_new_tokens_limit": 10}]},
     "default_max_new_tokens"),
    # a section of another engine kind is an error naming it, not silently ignored
    ({"models": [{"name": "a", "path": "/x", "images": {"max_steps": 5}}]}, "models[0].images"),
    ({"models": [{"name": "a", "path": "/x", "engine": "torch", "vllm": {"seed": 1}}]}, "models[0].vllm"),
    ({"models": [{"name": "a", "path": "/x", "engine": "transfusion", "vllm": {}}]}, "models[0].vllm"),
    ({"models": [{"name": "a", "path": "/x", "engine": "transfusion", "max_new_tokens_limit": 5}]},
     "models[0].max_new_tokens_limit"),
    ({"models": [{"name": "a", "path": "/x", "engine": "vllm", "images": {}}]}, "models[0].images"),
    ({"models": ["a"]}, "models[0]"),
])
def test_invalid_configs_name_the_field(data, named):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert named in str(err.value)


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  - name: a\n    path: /x\n    dtype: float8\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*models\[0\]\.dtype"):
        load_config(path)


def test_a_misplaced_section_says_which_engine_takes_it():
    with pytest.raises(ConfigError) as err:
        parse_config({"models": [{"name": "a", "path": "/x", "images": {"max_steps": 5}}]})
    assert "models[0].images: Extra inputs are not permitted (a key of engine: transfusion models)" in str(err.value)
    with pytest.raises(ConfigError, match=r"models\[0\]\.engine: unknown engine 'tensorrt'; choose one of 'torch'"):
        parse_config({"models": [{"name": "a", "path": "/x", "engine": "tensorrt"}]})


def test_each_engine_kind_gets_its_own_config_and_engine_class():
    from prunefusion.server.config import TorchModelConfig, TransfusionModelConfig, VllmModelConfig
    from prunefusion.server.registry import engine_class

    models = parse_config({"models": [{"name": "t", "path": "/x"}, {"name": "v", "path": "/x", "engine": "vllm"},
                                      {"name": "i", "path": "/x", "engine": "transfusion"}]}).models
    assert [type(m) for m in models] == [TorchModelConfig, VllmModelConfig, TransfusionModelConfig]
    assert [engine_class(m).__name__ for m in models] == ["TorchEngine", "VllmEngine", "TransfusionEngine"]
    assert [engine_class(m).task for m in models] == ["text", "text", "multimodal"]  # from the engine class


def test_cache_url_takes_variables_from_the_environment_and_names_an_unset_one(monkeypatch):
    from prunefusion.server.app import cache_url
    from prunefusion.server.config import CacheConfig

    monkeypatch.setenv("PF_TEST_REDIS", "redis://:s3cret@127.0.0.1:6390/0")
    assert cache_url(CacheConfig(url="${PF_TEST_REDIS}")) == "redis://:s3cret@127.0.0.1:6390/0"
    monkeypatch.delenv("PF_TEST_REDIS")
    with pytest.raises(ConfigError, match=r"cache.url: \$\{PF_TEST_REDIS\} is not set"):
        cache_url(CacheConfig(url="${PF_TEST_REDIS}"))
