"""Which files a model given as a hub id downloads (workers/model_files.py), through
huggingface_hub's own filter (the one snapshot_download applies); no network here."""

from huggingface_hub.utils import filter_repo_objects

from workers.model_files import DOWNLOAD_IGNORE, DOWNLOAD_PATTERNS

# openai/gpt-oss-20b's layout: the checkpoint at the top, the same weights again in original/
# (and metal/), each ~13 GB
GPT_OSS_FILES = ["config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json",
                 "model-00000-of-00002.safetensors", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "original/config.json", "original/dtypes.json",
                 "original/model.safetensors", "metal/model.bin", "README.md", "LICENSE", "USAGE_POLICY"]


def test_a_hub_download_takes_the_top_level_checkpoint_only():
    got = list(filter_repo_objects(GPT_OSS_FILES, allow_patterns=DOWNLOAD_PATTERNS, ignore_patterns=DOWNLOAD_IGNORE))
    assert got == GPT_OSS_FILES[:10]
    # without the ignore pattern the same weights would come twice
    assert "original/model.safetensors" in filter_repo_objects(GPT_OSS_FILES, allow_patterns=DOWNLOAD_PATTERNS)
