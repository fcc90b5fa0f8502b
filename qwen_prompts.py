"""Prompt text and action sets for every task. Edit this file by hand to change prompts.

Each task has:
  ACTIONS[task]        ordered {action name: instruction given to the system LLM}
  ROLES[task]          (system role, user role) as they appear in transcripts
  SYSTEM_PROMPT[task]  the system LLM's role-play instructions (formatted with the case)
  USER_PROMPT[task]    the user LLM's role-play instructions (formatted with the case)
  CRITIC_PROMPT[task]  the question the critic LLM answers about the conversation
  VERDICTS[task]       {verdict sentence offered to the critic: reward}

Placeholders in braces are filled from the case fields (see tasks.py, `case_fields`).
Every verdict offered to the critic must have a reward: tasks.py checks this at import.
"""

ACTIONS = {
    "esc": {
        "Question": "Ask the Patient an open question to learn more about the problem.",
        "Self-disclosure": "Share a similar experience of your own to show you understand.",
        "Affirmation and Reassurance": "Affirm the Patient's strengths and reassure them.",
        "Providing Suggestions": "Suggest concrete ways the Patient could deal with the problem.",
        "Others": "Respond naturally to keep the conversation going.",
        "Reflection of feelings": "Reflect back the feelings the Patient has expressed.",
        "Information": "Give useful information, facts or resources about the problem.",
        "Restatement or Paraphrasing": "Restate what the Patient said in your own words.",
    },
    "extes": {
        "Reflective Statements": "Reflect back what the User has said and felt.",
        "Clarification": "Ask the User to clarify what they mean.",
        "Emotional Validation": "Tell the User that their emotions are understandable.",
        "Empathetic Statements": "Express empathy for what the User is going through.",
        "Affirmation": "Affirm the User's strengths and efforts.",
        "Offer Hope": "Offer the User hope that things can get better.",
        "Avoid Judgment and Criticism": "Accept the User's choices without judging them.",
        "Suggest Options": "Suggest some options the User could consider.",
        "Collaborative Planning": "Work out a plan together with the User.",
        "Provide Different Perspectives": "Offer another way of looking at the situation.",
        "Reframe Negative Thoughts": "Help the User reframe a negative thought.",
        "Share Information": "Share useful information related to the problem.",
        "Normalize Experiences": "Tell the User that many people have similar experiences.",
        "Promote Self-Care Practices": "Encourage the User to take care of themselves.",
        "Stress Management": "Suggest a technique for managing stress.",
        "Others": "Respond naturally to keep the conversation going.",
    },
    "cima": {
        "Hint": "Give the Student a hint about a word or phrase they have not translated yet.",
        "Question": "Ask the Student a question that leads them towards the translation.",
        "Correction": "Correct the mistake in the Student's translation.",
        "Confirmation": "Confirm the part of the translation that the Student got right.",
        "Others": "Encourage the Student to keep trying.",
    },
    "cb": {
        "Greetings": "Greet the Seller politely.",
        "Ask a question": "Ask the Seller a question about the item.",
        "Answer a question": "Answer the Seller's question.",
        "Propose the first price": "Propose a first price for the item.",
        "Propose a counter price": "Propose a counter price that is lower than the Seller's.",
        "Use comparatives": "Compare with similar items to argue for a lower price.",
        "Confirm information": "Confirm a piece of information about the item.",
        "Affirm confirmation": "Affirm what the Seller has confirmed.",
        "Deny confirmation": "Deny what the Seller has said.",
        "Agree with the proposal": "Agree with the Seller's proposed price.",
        "Disagree with a proposal": "Disagree with the Seller's proposed price.",
    },
    "p4g": {
        "Greeting": "Greet the Persuadee.",
        "Logical appeal": "Use reasoning and evidence to argue for donating.",
        "Emotion appeal": "Appeal to the Persuadee's feelings about children in need.",
        "Credibility appeal": "Describe the credibility and impact of Save the Children.",
        "Personal story": "Tell a personal story that shows why donating matters.",
        "Self-modeling": "Say that you donate yourself, to set an example.",
        "Foot in the door": "Ask for a small donation first.",
        "Personal-related inquiry": "Ask about the Persuadee's own experience with charity.",
        "Source-related inquiry": "Ask whether the Persuadee knows Save the Children.",
        "Task-related inquiry": "Ask what the Persuadee thinks about donating.",
        "Donation information": "Explain how the donation can be made.",
        "Proposition of donation": "Ask the Persuadee to donate.",
        "Ask donation amount": "Ask how much the Persuadee would like to donate.",
        "Confirm donation": "Confirm the Persuadee's donation.",
        "Ask donate more": "Ask the Persuadee whether they would donate more.",
        "Praise user": "Praise the Persuadee.",
        "Acknowledgement": "Acknowledge what the Persuadee said.",
        "Comment partner": "Comment on what the Persuadee said.",
        "Closing": "Close the conversation politely.",
    },
}

ROLES = {
    "esc": ("Therapist", "Patient"),
    "extes": ("Supporter", "User"),
    "cima": ("Teacher", "Student"),
    "cb": ("Buyer", "Seller"),
    "p4g": ("Persuader", "Persuadee"),
}

SYSTEM_PROMPT = {
    "esc": "You are a Therapist talking with a Patient who has an emotional problem. "
    "Help the Patient feel better and solve the problem. Reply with one or two short sentences.",
    "extes": "You are a Supporter talking with a User who is going through a hard time. "
    "Support the User emotionally and help them cope. Reply with one or two short sentences.",
    "cima": "You are a Teacher helping a Student translate the English sentence \"{sentence}\" "
    "into Italian. The correct translation is \"{target}\". Do not give away the whole "
    "translation. Reply with one or two short sentences.",
    "cb": "You are a Buyer negotiating with a Seller for a {item_name}. Your target price is "
    "{buyer_price}; get as close to it as you can. Product description: "
    "{buyer_item_description}. Reply with one or two short sentences.",
    "p4g": "You are a Persuader asking a Persuadee to donate to the charity Save the Children. "
    "Reply with one or two short sentences.",
}

USER_PROMPT = {
    "esc": "You are a Patient talking with a Therapist. You feel {emotion_type} because of "
    "{problem_type}. Your situation: {situation} Reply as the Patient with one or two short "
    "sentences. Do not repeat yourself.",
    "extes": "You are a User talking with a Supporter. Your situation: {situation} Reply as "
    "the User with one or two short sentences.",
    "cima": "You are a Student learning Italian. You are translating \"{sentence}\" into "
    "Italian and you make some mistakes. Reply as the Student with one short sentence.",
    "cb": "You are a Seller selling a {item_name}. Your target price is {seller_price}; do "
    "not go much lower. Product description: {seller_item_description}. Reply as the Seller "
    "with one or two short sentences.",
    "p4g": "You are a Persuadee talking with a Persuader about donating to Save the Children. "
    "You are not sure about donating. Reply as the Persuadee with one or two short sentences.",
}

EMOTION_FORMAT = (
    "First name the {user_role}'s current emotion in one word, then give your reply, in "
    "exactly this format:\nEmotion: <one word>\nResponse: <your reply>"
)

PLANNER_PROMPT = (
    "The following is a conversation between a {system_role} and a {user_role}.\n"
    "{transcript}\n"
    "Emotions of the {user_role} so far: {emotions}\n\n"
    "Which strategy should the {system_role} use next? The strategies are:\n"
    "{options}\n"
    "Answer with the number of the best strategy only."
)

CRITIC_TEMPLATE = (
    "The following is a conversation between a {system_role} and a {user_role}.\n"
    "{transcript}\n"
    "Emotions of the {user_role} so far: {emotions}\n\n"
    "{question}\nYou can only reply with one of the following sentences:\n{verdicts}"
)

CRITIC_PROMPT = {
    "esc": "Has the Patient's issue been solved?",
    "extes": "Does the User feel better now?",
    "cima": "Has the Student correctly translated the whole sentence \"{sentence}\" into "
    "Italian (\"{target}\")?",
    "cb": "Have the Buyer and the Seller reached a deal at the end of the conversation? If "
    "they have, give the agreed price in place of [price].",
    "p4g": "Has the Persuadee decided to donate to Save the Children?",
}

# Each verdict sentence is matched by its distinguishing words (see critic.py). For cb the
# "[price]" verdict's reward is replaced by the sale-to-list ratio of the extracted price.
VERDICTS = {
    "esc": {
        "No, the Patient feels worse.": -1.0,
        "No, the Patient feels the same.": -0.5,
        "No, but the Patient feels better.": 0.5,
        "Yes, the Patient's issue has been solved.": 1.0,
    },
    "extes": {
        "No, the User feels worse.": -1.0,
        "No, the User feels the same.": -0.5,
        "Yes, the User feels somewhat better.": 0.5,
        "Yes, the User's problem has been solved.": 1.0,
    },
    "cima": {
        "No, the Student made an incorrect translation.": -1.0,
        "No, the Student did not try to translate.": -0.5,
        "No, the Student only translated part of the sentence correctly.": 0.5,
        "Yes, the Student correctly translated the whole sentence.": 1.0,
    },
    "cb": {
        "They have not reached a deal.": -0.1,
        "They have reached a deal at [price].": 1.0,
    },
    "p4g": {
        "The Persuadee has explicitly refused.": -1.0,
        "The Persuadee remains neutral about donating.": -0.5,
        "The Persuadee has a positive attitude towards donating but hasn't decided yet.": 0.5,
        "The Persuadee has agreed to donate.": 1.0,
    },
}

# Fixed opening turns used when a case has none of its own (see tasks.py, `opening_turns`).
DEFAULT_OPENINGS = {
    "cb": [("Buyer", "Hi, how much is the {item_name}?"),
           ("Seller", "Hi, this is a good {item_name} and its price is {seller_price}.")],
    "p4g": [("Persuader", "Hello. How are you?"),
            ("Persuadee", "I'm good, thank you. How about you?")],
}
