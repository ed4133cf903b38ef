"""mlora.monitor"""
