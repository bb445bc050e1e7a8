"""Z-Explorer's LLM side: talks to the gateway with the OpenAI SDK (being built; see issue 4)."""
