import pytest

from p2psched.config import ConfigError, load_settings


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path, monkeypatch):
    cfg = tmp_path / "a.toml"
    cfg.write_text('queue_limit = 7\ngrace_s = 3.0\ndispatch_policy = "fifo"\nnode_id = "file"\n')
    monkeypatch.setenv("P2PSCHED_GRACE_S", "4.5")
    monkeypatch.setenv("P2PSCHED_NODE_ID", "env")
    s = load_settings(cfg, node_id="flag")
    assert s.node_id == "flag"  # flag beats env and file
    assert s.grace_s == 4.5  # env beats file
    assert s.queue_limit == 7  # file beats default
    assert s.dispatch_policy == "fifo"
    assert s.cpus is None and s.detected_cpus() >= 1  # default: detected


def test_list_settings_from_env_are_comma_separated(monkeypatch):
    monkeypatch.setenv("P2PSCHED_JOIN", "10.0.0.1:7701, 10.0.0.2:7701")
    assert load_settings(node_id="x").join == ["10.0.0.1:7701", "10.0.0.2:7701"]


@pytest.mark.parametrize(("kw", "needle"), [
    ({"queue_limit": 0}, "queue_limit"), ({"cpus": -1}, "cpus"), ({"api": "localhost"}, "api"),
    ({"join": ["nohost"]}, "join"), ({"dispatch_policy": "random"}, "dispatch_policy"),
])
def test_invalid_values_name_the_key(kw, needle):
    with pytest.raises(ConfigError) as e:
        load_settings(node_id="x", **kw)
    assert needle in str(e.value)


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("queue_limit = = 3\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_settings(bad)
