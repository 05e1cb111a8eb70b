from services.token_worker.app import main

main()
