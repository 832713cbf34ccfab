"""The ml_collections config loader: big_vision-style FILE.py:arg plus --config.x=y overrides."""
import textwrap

import pytest

from unclip_jax.config import ConfigError, load_config, parse_arg, split_overrides

CONFIG = textwrap.dedent('''
    """A test config."""
    import ml_collections
    from unclip_jax.config import parse_arg

    def get_config(arg=None):
        arg = parse_arg(arg, size="tiny", steps=10, runlocal=False, lr=1e-3)
        c = ml_collections.ConfigDict()
        c.size = arg.size
        c.steps = arg.steps
        c.runlocal = arg.runlocal
        c.optim = ml_collections.ConfigDict(dict(lr=arg.lr, betas=(0.9, 0.999), clip=True))
        c.name = "x"
        return c
''')


@pytest.fixture
def cfg_path(tmp_path):
    p = tmp_path / "exp.py"
    p.write_text(CONFIG)
    return str(p)


def test_arg_and_overrides_are_typed(cfg_path):
    c = load_config(f"{cfg_path}:size=base,steps=7,runlocal",
                    ["optim.lr=0.5", ("optim.betas", "0.8,0.95"), "optim.clip=false", "name=y"])
    assert (c.size, c.steps, c.runlocal) == ("base", 7, True)
    assert c.optim.lr == 0.5 and c.optim.betas == (0.8, 0.95) and c.optim.clip is False
    assert c.name == "y"


def test_loaded_config_is_locked(cfg_path):
    c = load_config(cfg_path)
    with pytest.raises(AttributeError):
        c.new_field = 1


def test_unknown_override_names_the_key_and_suggests(cfg_path):
    with pytest.raises(ConfigError, match=r"Unknown config key 'config.optim.lrr'.*Did you mean 'lr'"):
        load_config(cfg_path, ["optim.lrr=1"])


def test_unknown_arg_names_the_key(cfg_path):
    with pytest.raises(ConfigError, match=r"Unknown config argument 'szie'.*Did you mean 'size'"):
        load_config(f"{cfg_path}:szie=big")


@pytest.mark.parametrize("override, expected", [
    ("steps=ten", r"'config.steps' expects an integer, got 'ten'"),
    ("optim.lr=fast", r"'config.optim.lr' expects a number, got 'fast'"),
    ("optim.clip=maybe", r"'config.optim.clip' expects a boolean"),
    ("optim=1", r"'config.optim' is a group; set one of its fields: betas, clip, lr"),
])
def test_wrong_types_are_refused_with_the_key(cfg_path, override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(cfg_path, [override])


def test_wrong_arg_type_is_refused(cfg_path):
    with pytest.raises(ConfigError, match=r"Config key 'steps' expects an integer"):
        load_config(f"{cfg_path}:steps=1.5")


def test_missing_file_and_missing_get_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="has no get_config"):
        load_config(str(bad))


def test_split_overrides_both_spellings():
    overrides, rest = split_overrides(
        ["train", "--config.a.b=1", "--workdir", "w", "--config.c", "2", "--other"])
    assert overrides == [("a.b", "1"), ("c", "2")]
    assert rest == ["train", "--workdir", "w", "--other"]
    with pytest.raises(ConfigError, match="has no value"):
        split_overrides(["--config.a"])


def test_parse_arg_bare_key_needs_bool():
    assert parse_arg("flag", flag=False).flag is True
    with pytest.raises(ConfigError, match="needs a value"):
        parse_arg("n", n=3)
    assert parse_arg("sizes=1+2+3", sizes=(4,)).sizes == (1, 2, 3)
