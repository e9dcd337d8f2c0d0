"""Stage 4: self-improvement with verifiable rewards.

``questions`` (verifiable questions from our sharegpt parquet), ``verifier`` (one verdict, one reason per reject),
``rollouts`` (k samples per question with vLLM, offline or through OpenAI-compatible servers, resumable),
``outputs`` (RFT data, DPO pairs, KTO rows, dataset_info.json, pass@k statistics), ``tiny_task`` (a toy question
set) and ``quickstart_step`` (rollouts -> RFT -> DPO -> pass@1 before and after, for the quickstart).
"""
