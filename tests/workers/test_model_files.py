"""A model given as a hub id (workers/model_files.py): which files its download takes, through
huggingface_hub's own filter (the one snapshot_download applies), and the id it is served as; no
network here."""

from huggingface_hub.utils import filter_repo_objects

from workers.model_files import DOWNLOAD_IGNORE, download_patterns, served_model_name

# openai/gpt-oss-20b's layout: the checkpoint at the top, the same weights again in original/
# (and metal/), each ~13 GB
GPT_OSS_FILES = ["config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json",
                 "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "original/config.json", "original/dtypes.json",
                 "original/model.safetensors", "metal/model.bin", "README.md", "LICENSE", "USAGE_POLICY"]


def test_a_hub_download_takes_the_top_level_checkpoint_only():
    def taken(weights):
        return list(filter_repo_objects(GPT_OSS_FILES, allow_patterns=download_patterns(weights),
                                        ignore_patterns=DOWNLOAD_IGNORE))

    assert taken(True) == GPT_OSS_FILES[:10]
    # the endpoint's and the launcher's download: config and tokenizer, no weights
    assert taken(False) == [f for f in GPT_OSS_FILES[:10] if not f.endswith(".safetensors")]
    # without the ignore pattern the same weights would come twice
    assert "original/model.safetensors" in filter_repo_objects(GPT_OSS_FILES, allow_patterns=download_patterns())


def test_a_hub_model_is_served_as_its_id(tmp_path):
    """Not as its download's directory (a commit hash under the hub cache's snapshots/)."""
    snapshot = "/root/.cache/huggingface/hub/models--openai--gpt-oss-20b/snapshots/6cee5e81ee83917806bbde320786"
    assert served_model_name(snapshot, requested="openai/gpt-oss-20b") == "openai/gpt-oss-20b"
    assert served_model_name(snapshot, "gpt-oss", requested="openai/gpt-oss-20b") == "gpt-oss"
    local = tmp_path / "my-model"
    local.mkdir()
    assert served_model_name(str(local), requested=str(local)) == "my-model"
    assert served_model_name(str(local) + "/", requested=None) == "my-model"
