"""llm.py: LLM training in simple, raw Python; the Python counterpart of llm.c.

Engines (numpy, torch, triton) behind one interface (llmpy.engines), llm.c's file formats
(llmpy.formats), model shapes (llmpy.config), data (llmpy.data) and one training loop
(llmpy.train). See README.md.
"""

__version__ = "0.1.0"
