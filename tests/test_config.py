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
    ({"job_retention_h": -1}, "job_retention_h"), ({"host_retries": 21}, "host_retries"),
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


def test_membership_table_merges_file_and_env_json(tmp_path, monkeypatch):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[membership]\nprobe_interval = 2.0\ngossip_interval = 0.5\n')
    monkeypatch.setenv("P2PSCHED_MEMBERSHIP", '{"gossip_interval": 0.3}')
    s = load_settings(cfg, node_id="x")
    assert s.membership == {"probe_interval": 2.0, "gossip_interval": 0.3}


def test_env_json_that_does_not_parse_names_the_variable(monkeypatch):
    monkeypatch.setenv("P2PSCHED_MEMBERSHIP", "probe_interval=2")
    with pytest.raises(ConfigError, match="P2PSCHED_MEMBERSHIP: not JSON"):
        load_settings(node_id="x")


def test_env_values_are_validated_and_typed(monkeypatch):
    monkeypatch.setenv("P2PSCHED_NO_MDNS", "true")
    monkeypatch.setenv("P2PSCHED_CPUS", "2.5")
    s = load_settings(node_id="x")
    assert s.no_mdns is True and s.cpus == 2.5
    monkeypatch.setenv("P2PSCHED_QUEUE_LIMIT", "lots")
    with pytest.raises(ConfigError, match="queue_limit"):
        load_settings(node_id="x")


def test_unknown_file_key_is_refused_by_name(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text("queue_limt = 3\n")
    with pytest.raises(ConfigError, match="queue_limt: unknown key"):
        load_settings(cfg, node_id="x")
