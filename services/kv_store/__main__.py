from services.kv_store.app import main

main()
