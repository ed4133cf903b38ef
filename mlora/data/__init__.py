"""mlora.data"""
