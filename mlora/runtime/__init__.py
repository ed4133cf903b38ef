"""mlora.runtime"""
