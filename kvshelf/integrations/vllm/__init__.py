"""kvshelf inside vLLM: a v1 KV connector (`kv_connector_module_path: kvshelf.integrations.vllm`).

The connector class imports vLLM; the layout and planning modules beside it do not.
"""


def __getattr__(name: str):
    if name in ("KVShelfConnector", "connector_stats", "compute_missing_documents"):
        from kvshelf.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(name)
