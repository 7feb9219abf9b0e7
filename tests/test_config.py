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
    with pytest.raises(ConfigError, match=r"queue_limit \(from P2PSCHED_QUEUE_LIMIT\): "):
        load_settings(node_id="x")


def test_unknown_file_key_is_refused_by_name(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text("queue_limt = 3\n")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, node_id="x")
    assert f"queue_limt (from config file {cfg}): unknown key" in str(e.value)


@pytest.mark.parametrize(("key", "hint"), [
    ("queue_limt", "did you mean 'queue_limit'?"),
    ("max_request_byte", "did you mean 'max_request_bytes'?"),  # a setting with no flag in `agent --help`
    ("zzzz", "check its spelling."),
])
def test_unknown_file_key_names_the_closest_setting_and_every_setting(tmp_path, key, hint):
    from p2psched.config import AgentSettings

    cfg = tmp_path / "a.toml"
    cfg.write_text(f"{key} = 3\n")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg, node_id="x")
    said = str(e.value)
    assert f"{key} (from config file {cfg}): unknown key; {hint} The settings are: " in said
    assert "--help" not in said  # it lacks the settings that have no flag
    listed = said.split("The settings are: ")[1].split(", ")
    assert listed == sorted(AgentSettings.model_fields)
    assert {"request_body_timeout_s", "max_request_bytes", "membership", "allow_measurements"} <= set(listed)


@pytest.mark.parametrize(("kw", "expected"), [
    # a type error, not only a broken bound, still shows the whole range
    ({"queue_limit": "abc"}, "queue_limit: Input should be a valid integer, unable to parse string as an integer "
                             "(allowed: 1 to 10000000)"),
    ({"queue_limit": 0}, "queue_limit: Input should be greater than or equal to 1 (allowed: 1 to 10000000)"),
    # the bound that was broken and the other one
    ({"cpus": -1}, "cpus: Input should be greater than 0 (allowed: more than 0 and at most 4096)"),
    ({"mem_mb": 1.5}, "mem_mb: Input should be a valid integer, got a number with a fractional part "
                      "(allowed: 16 to 1073741824)"),
    # a length error names the length and the characters
    ({"node_id": ""}, "node_id: String should have at least 1 character (allowed: 1 to 64 characters: letters, "
                      "digits, '.', '_' and '-', starting with a letter or digit)"),
    ({"cluster_name": "x" * 65}, "cluster_name: String should have at most 64 characters "
                                 "(allowed: 1 to 64 characters)"),
    ({"api": "localhost"}, "api: String should match pattern '^[^\\s]*:\\d{1,5}$' (allowed: HOST:PORT, e.g. "
                           "127.0.0.1:7700)"),
    ({"placement_policy": "best"}, "placement_policy: Input should be 'p2p', 'local-first', 'random' or "
                                   "'round-robin'"),
    ({"no_mdns": "maybe"}, "no_mdns: Input should be a valid boolean, unable to interpret input "
                           "(allowed: true or false)"),
])
def test_invalid_values_name_the_key_and_the_whole_allowed_range(kw, expected):
    with pytest.raises(ConfigError) as e:
        load_settings(**{"node_id": "x", **kw})
    assert str(e.value) == f"configuration: {expected}"


def test_every_bounded_setting_has_its_range_in_words():
    from p2psched.config import AgentSettings, allowed_values

    for name, field in AgentSettings.model_fields.items():
        if field.metadata or "Literal" in str(field.annotation):
            words = allowed_values(name)
            assert words and "None" not in words and "^" not in words, (name, words)


def test_a_numeric_agent_flag_that_is_not_a_number_gets_the_range(tmp_path):
    from agents import cli

    p = cli("agent", "--node-id", "x", "--data-dir", tmp_path, "--queue-limit", "lots")
    assert p.returncode == 2
    assert b"queue_limit: Input should be a valid integer" in p.stderr and b"(allowed: 1 to 10000000)" in p.stderr


def test_every_setting_is_documented_and_each_flag_shows_its_default():
    from p2psched.cli.agent import agent
    from p2psched.config import AgentSettings, _number

    fields = AgentSettings.model_fields
    assert not [name for name, f in fields.items() if not f.description]
    for param in agent.params:
        field = fields.get(param.name or "")
        if field is None or field.default is None or isinstance(field.default, bool) or field.default_factory:
            continue
        assert f"[{_number(field.default)}]" in (getattr(param, "help", "") or ""), (param.name, field.default)


def test_the_config_file_can_be_named_in_the_environment(tmp_path, monkeypatch):
    by_env = tmp_path / "env.toml"
    by_env.write_text('queue_limit = 7\ngrace_s = 3.0\n')
    monkeypatch.setenv("P2PSCHED_CONFIG", str(by_env))
    monkeypatch.setenv("P2PSCHED_GRACE_S", "4.5")
    s = load_settings(node_id="x")
    assert s.queue_limit == 7  # read from the file $P2PSCHED_CONFIG names
    assert s.grace_s == 4.5  # and the environment still beats that file
    by_flag = tmp_path / "flag.toml"
    by_flag.write_text("queue_limit = 9\n")
    assert load_settings(by_flag, node_id="x").queue_limit == 9  # --config beats $P2PSCHED_CONFIG


def test_a_missing_config_file_named_in_the_environment_says_so(tmp_path, monkeypatch):
    from agents import cli

    monkeypatch.setenv("P2PSCHED_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="nope.toml does not exist; set P2PSCHED_CONFIG to an existing TOML file"):
        load_settings(node_id="x")
    p = cli("agent", "--node-id", "x", "--data-dir", tmp_path / "data")  # the agent reads it too
    assert p.returncode == 2 and b"P2PSCHED_CONFIG" in p.stderr, p.stderr


def test_node_labels_from_flags_env_and_file_a_higher_source_replacing_a_lower(tmp_path, monkeypatch):
    cfg = tmp_path / "a.toml"
    cfg.write_text('[labels]\nzone = "a"\nrack = "r1"\n')
    assert load_settings(cfg, node_id="x").labels == {"zone": "a", "rack": "r1"}
    monkeypatch.setenv("P2PSCHED_LABELS", "zone=b, tier=batch")
    assert load_settings(cfg, node_id="x").labels == {"zone": "b", "tier": "batch"}  # not merged with the file's
    assert load_settings(cfg, node_id="x", labels=["zone=c"]).labels == {"zone": "c"}  # --label zone=c


@pytest.mark.parametrize(("labels", "expected"), [
    (["zone"], "label 'zone' must be KEY=VALUE, e.g. zone=a"),
    (["zone=a", "zone=b"], "label 'zone' is given twice ('a' and 'b'); give each key once"),
    (["gpu.model=H100"], "label key 'gpu.model': gpu.* labels are set by the GPU inventory (docs/gpu.md); "
                         "choose another key"),
    (["node.zone=a"], "label key 'node.zone': give it without 'node.' (zone=a); a job asks for it as node.zone=a"),
    (["zo ne=a"], "label key 'zo ne' has a character or length that is not allowed"),
    (["zone=" + "a" * 64], f"label zone={'a' * 64!r}: the value has a character or length that is not allowed"),
    (["zone="], "label zone='': the value has a character or length that is not allowed"),
    ([f"k{i}=v" for i in range(17)], "17 labels given; keep the ones placement needs"),
])
def test_bad_node_labels_are_refused_naming_the_label_and_the_rules(labels, expected):
    with pytest.raises(ConfigError) as e:
        load_settings(node_id="x", labels=labels)
    assert str(e.value) == (
        f"configuration: labels: {expected} (allowed: at most 16 KEY=VALUE pairs; each key and value 1 to 63 "
        "letters, digits, '.', '_' and '-', starting and ending with a letter or digit; no key starting with gpu. "
        "or node.)")


def test_a_nearly_right_environment_variable_is_named_with_the_right_one():
    from p2psched.config import misspelt_env

    # P2PSCHED_LABEL=zone=a was ignored without a word: the setting is P2PSCHED_LABELS.
    env = {"P2PSCHED_LABEL": "zone=a", "P2PSCHED_QUEUE_LIMT": "5", "PATH": "/bin",
           # not settings, and nothing like one: the client's, the container entrypoint's
           "P2PSCHED_URL": "http://x:7700", "P2PSCHED_CLUSTER": "c", "P2PSCHED_REPLICA_INDEX": "1",
           "P2PSCHED_LABELS": "zone=b", "P2PSCHED_CONFIG": "a.toml"}
    assert misspelt_env(env) == [
        "P2PSCHED_LABEL is not a setting and is ignored; did you mean P2PSCHED_LABELS?",
        "P2PSCHED_QUEUE_LIMT is not a setting and is ignored; did you mean P2PSCHED_QUEUE_LIMIT?",
    ]


@pytest.mark.cluster
def test_the_agent_logs_a_misspelt_variable_at_start(tmp_path):
    from agents import new_agent

    agent = new_agent(tmp_path, "spelt")
    agent.env["P2PSCHED_LABEL"] = "zone=a"
    agent.start()
    try:
        assert "P2PSCHED_LABEL is not a setting and is ignored; did you mean P2PSCHED_LABELS?" in agent.log()
    finally:
        agent.stop()
