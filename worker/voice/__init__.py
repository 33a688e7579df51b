"""Streaming voice-conversation engine: VAD → STT → LLM → TTS over a WebSocket or a LiveKit room."""
